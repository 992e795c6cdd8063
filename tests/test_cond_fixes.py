"""Conditional-model leftovers: a pipeline without its text encoder is refused up front (CLI: exit 2, one line,
no output), Flux keeps ``true_cfg_scale`` when rebuilt at another guidance, SDXL tells "no negative prompt"
(zeros) from an explicit "" apart, pipeline adapters guide only for w > 1 as the pipelines do, and MMHM of a
guidance-list sweep is normalised per (NFE, guidance) cell with frozen bounds keyed by both.
"""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

from schedules.conditioning import Conditioning, bind, with_guidance
from schedules.io import StepsmithError
from schedules.pipeline_adapters import adapter_from_pipeline
from schedules.solvers import sample
from tests.test_pipeline_adapters import assert_same, prompt_pipeline_vs_stepsmith, vp_table

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::eval.metrics.FewSamplesWarning")

PROMPTS = ("a cat", "cat cat")


def rebuilt(pipe, **components):
    """The same pipeline class over the same components, some replaced (e.g. ``text_encoder=None``)."""
    params = inspect.signature(type(pipe).__init__).parameters
    return type(pipe)(**{k: v for k, v in {**pipe.components, **components}.items() if k in params})


def network_at(adapter, seed=0, t=500.0):
    x = adapter.noise(2, seed)
    with torch.no_grad(), bind(torch.arange(2)):
        return adapter.network(x, torch.full((2,), t))


# ------------------------------------------------------------------ 1. no text encoder


@pytest.mark.parametrize("which,missing", [
    ("sd", "text_encoder"), ("sd", "tokenizer"),
    ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2"),
    ("sd3", "text_encoder"), ("sd3", "text_encoder_2"), ("sd3", "tokenizer_3"),
    ("flux", "text_encoder"), ("flux", "text_encoder_2"),
])
def test_a_pipeline_without_its_text_encoder_is_refused_up_front(request, which, missing):
    pipe = rebuilt(request.getfixturevalue(f"{which}_pipe"), **{missing: None})
    assert getattr(pipe, missing) is None
    with pytest.raises(StepsmithError, match=rf"has no {missing} .*precomputed prompt embeddings") as err:
        adapter_from_pipeline(pipe, Conditioning(prompts=PROMPTS, negative="cat", guidance=2.0, height=16, width=16))
    assert err.value.param == "prompts" and "\n" not in str(err.value)


def test_sd3_without_t5_is_the_pipelines_zeros(sd3_pipe):
    """SD3's T5 is optional (the pipeline puts zeros in its place): not refused, and exact."""
    from tests.test_diffusers_pipelines import flow_table
    from tests.test_pipeline_adapters_flow import pipeline_latents, stepsmith_latents

    pipe = rebuilt(sd3_pipe, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_from_pipeline(pipe, Conditioning(prompts=("a cat", "a dog"), guidance=3.0, height=16, width=16))
    table = flow_table((1.0, 0.6, 0.25, 0.0))
    noise = adapter.noise(2, 3)
    want = pipeline_latents(pipe, table, noise, guidance_scale=3.0)
    torch.testing.assert_close(stepsmith_latents(adapter, table, noise)[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["saved-as-none", "folder-removed"])
def test_cli_search_on_a_folder_without_its_text_encoder(sd_pipe, sd_folder, tmp_path, capsys, how):
    from schedules.cli import main

    folder = tmp_path / "no-te"
    if how == "saved-as-none":
        rebuilt(sd_pipe, text_encoder=None).save_pretrained(folder, safe_serialization=True)
        assert json.loads((folder / "model_index.json").read_text())["text_encoder"] == [None, None]
    else:
        shutil.copytree(sd_folder, folder)
        shutil.rmtree(folder / "text_encoder")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\ncat cat\n")
    out = tmp_path / "t.json"
    capsys.readouterr()
    rc = main(["search", "--model", str(folder), "--prompts", str(prompts), "--guidance", "7.5", "--height", "16",
               "--width", "16", "--nfe", "2", "--samples", "2", "--grid", "6", "--no-progress", "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "has no text_encoder" in err[0] and "precomputed prompt embeddings" in err[0], err
    assert "AttributeError" not in err[0] and "safetensors only" not in err[0]


# ------------------------------------------------------------------ 2. Flux true CFG survives with_guidance


def test_flux_with_guidance_keeps_true_cfg(flux_dev_pipe):
    cond = Conditioning(prompts=("a cat", "a dog"), negative="dog", guidance=3.5, height=16, width=16)
    a = adapter_from_pipeline(flux_dev_pipe, cond, true_cfg_scale=2.0, max_sequence_length=8)
    g = with_guidance(a, 2.0)
    assert g.pipeline is flux_dev_pipe and g.pipeline_options == {"true_cfg_scale": 2.0, "max_sequence_length": 8}
    assert g.conditioning.guidance == 2.0 and g.guided  # the true CFG of the original adapter, not lost
    assert g.conditioning.extra["distilled_guidance"] == 2.0  # the rebuilt scale is the embedded guidance
    assert g.condition_kwargs.cond["encoder_hidden_states"].shape[1] == 8
    fresh = adapter_from_pipeline(flux_dev_pipe, cond.with_guidance(2.0), true_cfg_scale=2.0, max_sequence_length=8)
    no_cfg = adapter_from_pipeline(flux_dev_pipe, cond.with_guidance(2.0), max_sequence_length=8)
    torch.testing.assert_close(network_at(g), network_at(fresh), atol=0, rtol=0)
    assert float((network_at(g) - network_at(no_cfg)).abs().max()) > 1e-4


# ------------------------------------------------------------------ 3. SDXL: no negative prompt vs ""


def test_sdxl_none_and_empty_negative_are_told_apart_under_force_zeros(sdxl_pipe):
    assert sdxl_pipe.config.force_zeros_for_empty_prompt
    none = adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=PROMPTS, guidance=5.0))
    empty = adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=PROMPTS, negative="", guidance=5.0))
    assert torch.count_nonzero(none.condition_kwargs.uncond["encoder_hidden_states"]) == 0
    assert torch.count_nonzero(empty.condition_kwargs.uncond["encoder_hidden_states"]) > 0
    assert none.conditioning.describe()["negative_embeds"] == "zeros"
    assert "negative_embeds" not in empty.conditioning.describe()
    assert none.conditioning.fingerprint() != empty.conditioning.fingerprint()
    # the explicit "" is the pipeline's own negative_prompt="" run
    table = vp_table(empty, (999.0, 601.0, 201.0, 11.0))
    noise = empty.noise(2, seed=4)
    from schedules.diffusers import pipeline_kwargs, remove_table
    from tests.test_pipeline_adapters import pipeline_latents

    kw = pipeline_kwargs(table, sdxl_pipe)
    try:
        ref = sdxl_pipe(list(PROMPTS), negative_prompt=["", ""], latents=pipeline_latents(sdxl_pipe, kw, noise),
                        guidance_scale=5.0, output_type="latent", height=16, width=16, **kw).images
    finally:
        remove_table(sdxl_pipe)
    assert_same(sample(empty, noise, table.sigmas, "euler"), ref)
    assert (sample(none, noise, table.sigmas, "euler") - ref).abs().max() > 1e-2
    # a rebuild at another guidance keeps "no negative prompt" (zeros), from w = 1 too
    up = with_guidance(adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=PROMPTS)), 5.0)
    assert up.conditioning.fingerprint() == none.conditioning.fingerprint()
    assert torch.count_nonzero(up.condition_kwargs.uncond["encoder_hidden_states"]) == 0


def test_fingerprints_are_unchanged_where_none_and_empty_agree(sd_pipe, sdxl_pipe):
    def plain(negative, w):  # the fingerprint of the condition set alone (no recorded extras): the formula of before
        return Conditioning(prompts=PROMPTS, negative=negative, guidance=w, height=16, width=16).fingerprint()

    # SDXL at w = 1 (and w ≤ 1: no negative branch) — the same conditioning, the same fingerprint
    for w in (1.0, 0.5):
        a = adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=PROMPTS, guidance=w))
        b = adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=PROMPTS, negative="", guidance=w))
        assert a.conditioning.fingerprint() == b.conditioning.fingerprint() == plain("", w)
    # SDXL without force_zeros_for_empty_prompt: None is the encoded "" too
    loose = rebuilt(sdxl_pipe, force_zeros_for_empty_prompt=False)
    assert not loose.config.force_zeros_for_empty_prompt
    a = adapter_from_pipeline(loose, Conditioning(prompts=PROMPTS, guidance=5.0))
    b = adapter_from_pipeline(loose, Conditioning(prompts=PROMPTS, negative="", guidance=5.0))
    assert a.conditioning.fingerprint() == b.conditioning.fingerprint() == plain("", 5.0)
    torch.testing.assert_close(a.condition_kwargs.uncond["encoder_hidden_states"],
                               b.condition_kwargs.uncond["encoder_hidden_states"])
    # SD: "" is its default negative prompt
    for neg in (None, "", "cat"):
        sd = adapter_from_pipeline(sd_pipe, Conditioning(prompts=PROMPTS, negative=neg, guidance=7.5))
        assert sd.conditioning.fingerprint() == plain("" if neg is None else neg, 7.5)


# ------------------------------------------------------------------ 6. w ≤ 1: the conditional branch alone


def test_sd_at_guidance_below_one_is_the_pipelines(sd_pipe):
    adapter = adapter_from_pipeline(sd_pipe, Conditioning(prompts=PROMPTS, guidance=0.5))
    assert adapter.guide_above_one and not adapter.guided
    table = vp_table(adapter, (999.0, 734.5, 402.0, 151.25, 21.0))
    ref, out, noise = prompt_pipeline_vs_stepsmith(sd_pipe, adapter, table, 0.5)
    assert (ref - noise).abs().max() > 0.1
    assert_same(out, ref)
    assert adapter.calls == table.nfe
    # what stepsmith did before (o_u + 0.5·(o_c − o_u)) is not the pipeline's result
    mixed = adapter_from_pipeline(sd_pipe, Conditioning(prompts=PROMPTS, guidance=0.5))
    mixed.guide_above_one = False
    assert mixed.guided and (sample(mixed, noise, table.sigmas, "euler") - ref).abs().max() > 1e-2
    # at w = 0 too: the pipeline runs the conditional branch alone
    zero = adapter_from_pipeline(sd_pipe, Conditioning(prompts=PROMPTS, guidance=0.0))
    ref0, out0, _ = prompt_pipeline_vs_stepsmith(sd_pipe, zero, table, 0.0)
    assert_same(out0, ref0)
    assert_same(out0, out)  # 0 and 0.5 are the same unguided run


def test_dit_at_guidance_below_one_is_the_pipelines(dit_pipe):
    from schedules.interchange import table_from_timesteps
    from tests.tiny_pipelines import dit_final_latents

    labels = [207, 360]
    adapter = adapter_from_pipeline(dit_pipe, Conditioning(labels=tuple(labels), guidance=0.5))
    sch = dit_pipe.scheduler
    sch.set_timesteps(4)
    table = table_from_timesteps(sch.timesteps.tolist(), adapter=adapter, solver="ddim", model="tiny-dit")
    ref = dit_final_latents(dit_pipe, labels, 0.5, 4)
    assert ref.shape[0] == 2  # no CFG batch in the pipeline at w ≤ 1
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    out = sample(adapter, noise, table.sigmas, "ddim")
    assert (ref - noise).abs().max() > 0.1
    assert_same(out, ref)


def test_flux_below_one_needs_no_negative_prompt(flux_pipe):
    cond = Conditioning(prompts=PROMPTS, guidance=0.5, height=16, width=16)
    a = adapter_from_pipeline(flux_pipe, cond)
    plain = adapter_from_pipeline(flux_pipe, cond.with_guidance(1.0))
    assert not a.guided and a.condition_kwargs.uncond is None
    torch.testing.assert_close(network_at(a), network_at(plain), atol=0, rtol=0)
    with pytest.raises(StepsmithError, match="negative prompt"):
        adapter_from_pipeline(flux_pipe, cond.with_guidance(1.5))


def test_embedded_class_conditional_models_still_guide_below_one():
    from schedules import load_model

    m = load_model("builtin:digits-cond", conditioning=Conditioning(labels=(1, 7), guidance=0.5))
    assert not m.guide_above_one and m.guided
    c = with_guidance(m, 1.0)
    u = load_model("builtin:digits-cond", conditioning=Conditioning(labels=(1, 7), guidance=0.0))
    x, s = m.noise(2, 0), torch.full((2,), 0.5, dtype=torch.float64)
    with torch.no_grad(), bind(torch.arange(2)):  # the denoiser is affine in the network output
        d_c, d_u, d = (a.denoise(x, s) for a in (c, u, m))
    torch.testing.assert_close(d, d_u + 0.5 * (d_c - d_u), atol=1e-5, rtol=1e-5)
    assert float((d - d_c).abs().max()) > 1e-3


# ------------------------------------------------------------------ 5. MMHM per (NFE, guidance)

EVAL = ["eval", "--model", "builtin:digits-cond", "--classes", "1,7", "--methods", "uniform,karras,ays-published",
        "--nfe", "2", "--num", "24", "--no-teacher", "--metric", "fid,kid,precision,mmhm", "--grid", "0"]


@pytest.fixture(scope="module")
def guidance_run(tmp_path_factory):
    from schedules.cli import main

    d = tmp_path_factory.mktemp("mmhm-w")
    assert main([*EVAL, "--guidance", "1,3", "--save-bounds", str(d / "b.json"), "--out", str(d / "o")]) == 0
    return d, json.loads((d / "o" / "report.json").read_text())


def test_mmhm_is_grouped_per_nfe_and_guidance(guidance_run):
    from eval.mmhm import mmhm

    _, rep = guidance_run
    mm = rep["mmhm"]
    assert mm["group_by"] == "nfe,guidance" and sorted(mm["bounds"]) == ["2,w=1", "2,w=3"]
    assert "(NFE, guidance)" in mm["bounds_source"]
    assert [(a["nfe"], a["guidance"]) for a in mm["agreement"]] == [(2, 1.0), (2, 3.0)]
    names = ["fid", "kid", "precision"]
    pooled = mmhm([r["metrics"] for r in rep["results"]], names)  # per NFE only: both guidances in one pool
    for w in (1.0, 3.0):
        cell = [r for r in rep["results"] if r["guidance"] == w]
        assert len(cell) == 3
        ref = mmhm([r["metrics"] for r in cell], names)
        assert [r["metrics"]["mmhm"] for r in cell] == pytest.approx(list(ref), rel=1e-12)
        assert mm["bounds"][f"2,w={w:g}"]["fid"]["min"] == min(r["metrics"]["fid"] for r in cell)
    # the guidance-3 rows lie far from the guidance-1 ones: a per-NFE pool would score them differently
    assert [r["metrics"]["mmhm"] for r in rep["results"]] != pytest.approx(list(pooled), rel=1e-3)


def test_frozen_bounds_carry_the_guidance(guidance_run, tmp_path, capsys):
    from eval.mmhm import GroupedBounds, load_bounds, mmhm
    from schedules.cli import main

    d, rep = guidance_run
    b = load_bounds(d / "b.json")
    assert isinstance(b, GroupedBounds) and b.group_by == "nfe,guidance" and set(b.groups) == {"2,w=1", "2,w=3"}
    # frozen: a run of one method keeps the scores of the full run
    assert main([*EVAL[:6], "karras", *EVAL[7:], "--guidance", "1,3", "--bounds", str(d / "b.json"),
                 "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    want = {r["guidance"]: r["metrics"]["mmhm"] for r in rep["results"] if r["label"] == "karras"}
    assert {r["guidance"]: r["metrics"]["mmhm"] for r in again["results"]} == pytest.approx(want, rel=1e-12)
    # bounds keyed by guidance: a guidance outside them, or a run without a guidance list, is refused
    capsys.readouterr()
    assert main([*EVAL, "--guidance", "1,5", "--bounds", str(d / "b.json"), "--out", str(tmp_path / "w5")]) == 2
    err = capsys.readouterr().err
    assert "no (NFE, guidance) group 2,w=5" in err and not (tmp_path / "w5").exists()
    assert main([*EVAL, "--guidance", "3", "--bounds", str(d / "b.json"), "--out", str(tmp_path / "w3")]) == 0
    assert main([*EVAL, "--bounds", str(d / "b.json"), "--out", str(tmp_path / "none")]) == 2
    assert "--guidance" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # an old per-NFE bounds file (no guidance) still reads, and serves every guidance of its NFE
    old = GroupedBounds({"2": b.groups["2,w=1"]}, "nfe")
    old.save(tmp_path / "old.json")
    assert json.loads((tmp_path / "old.json").read_text())["group_by"] == "nfe"
    assert main([*EVAL, "--guidance", "1,3", "--bounds", str(tmp_path / "old.json"),
                 "--out", str(tmp_path / "old")]) == 0
    res = json.loads((tmp_path / "old" / "report.json").read_text())["results"]
    for w in (1.0, 3.0):
        cell = [r for r in res if r["guidance"] == w]
        ref = mmhm([r["metrics"] for r in cell], ["fid", "kid", "precision"], bounds=old.groups["2"])
        assert [r["metrics"]["mmhm"] for r in cell] == pytest.approx(list(ref), rel=1e-12)


def test_grouped_bounds_file_checks(tmp_path):
    from eval.mmhm import GroupedBounds, group_key, load_bounds

    assert (group_key(4), group_key(4, 3.0), group_key(4, 7.5), group_key(2, 0.1 + 0.2)) == (
        "4", "4,w=3", "4,w=7.5", f"2,w={0.1 + 0.2!r}")
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"format": "stepsmith.mmhm-grouped-bounds/v1", "group_by": "method",
                             "groups": {"2": {"fid": {"min": 1, "max": 2}}}}))
    with pytest.raises(StepsmithError, match="group_by"):
        load_bounds(p)
    g = GroupedBounds.from_json({"group_by": "nfe", "groups": {"2": {"fid": {"min": 1, "max": 2}}}})
    assert g.lookup(2, 3.0) is g.lookup(2) is g.get("2")
    with pytest.raises(StepsmithError, match="no nfe 4 group"):
        g.lookup(4, 1.0)
