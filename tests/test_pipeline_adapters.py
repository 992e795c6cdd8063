"""Pipeline adapters (SD, SDXL, DiT) against the real diffusers pipelines, built offline with tiny random
weights: stepsmith's sampler along a table must end at the latents the pipeline itself produces with the
same table and the same noise (CFG included), from memory and from a saved pipeline folder; micro-batches
must not change a sample; a guided evaluation is one call; bad input fails with one clear error.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from schedules.adapters import load_model
from schedules.conditioning import Conditioning, bind
from schedules.diffusers import pipeline_kwargs, remove_table
from schedules.interchange import table_from_timesteps
from schedules.io import StepsmithError
from schedules.pipeline_adapters import adapter_from_pipeline
from schedules.solvers import sample
from schedules.table import TimestepTable

torch.set_num_threads(1)

PROMPTS = ("a cat", "cat cat")
# Tolerance, relative to the latents' scale (random tiny weights under CFG drive them to |x| ~ 50): the
# pipeline and stepsmith run the same float32 network calls, but on batches ordered [uncond; cond] vs
# [cond; uncond], with the timestep as int/float64 vs float32 and the state updated in another
# (algebraically equal) form. Measured gaps: < 6e-7 of the scale (SD 1.9e-5 at max|x| 56.6, SDXL 2.8e-5
# at 49.1, DiT 4.6e-5 at 163.5).
RTOL_SCALE = 1e-5


def assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, atol=RTOL_SCALE * max(1.0, float(ref.abs().max())), rtol=0)


def vp_table(adapter, ts, solver="euler") -> TimestepTable:
    return table_from_timesteps(ts, adapter=adapter, solver=solver, model="tiny")


def pipeline_latents(pipe, kw: dict, noise: torch.Tensor) -> torch.Tensor:
    """The ``latents=`` that make the pipeline start from stepsmith's state ``noise``: the pipeline multiplies
    them by ``init_noise_sigma`` and feeds ``scale_model_input`` of its state to the UNet (the VP state)."""
    sch = pipe.scheduler
    sch.set_timesteps(**kw)
    c = float(sch.scale_model_input(torch.ones(1), sch.timesteps[0]))
    return noise / (c * float(sch.init_noise_sigma))


def prompt_pipeline_vs_stepsmith(pipe, adapter, table, guidance):
    noise = adapter.noise(len(PROMPTS), seed=3)
    kw = pipeline_kwargs(table, pipe)
    try:
        latents = pipeline_latents(pipe, kw, noise)
        ref = pipe(list(PROMPTS), latents=latents, guidance_scale=guidance, output_type="latent", height=16, width=16,
                   **kw).images
    finally:
        remove_table(pipe)
    adapter.calls = 0
    out = sample(adapter, noise, table.sigmas, table.solver)
    return ref, out, noise


# ------------------------------------------------------------------ exactness against the pipelines


def test_sd_matches_the_pipeline_with_cfg(sd_pipe):
    cond = Conditioning(prompts=PROMPTS, guidance=7.5)
    adapter = adapter_from_pipeline(sd_pipe, cond)
    assert adapter.sample_shape == (4, 8, 8) and adapter.conditioning.negative == ""
    assert (adapter.conditioning.height, adapter.conditioning.width) == (16, 16)
    table = vp_table(adapter, (999.0, 734.5, 402.0, 151.25, 21.0))
    ref, out, noise = prompt_pipeline_vs_stepsmith(sd_pipe, adapter, table, 7.5)
    assert adapter.calls == table.nfe == 5  # CFG doubles the batch, not the NFE
    assert (ref - noise).abs().max() > 0.1  # the run moved the latents
    assert_same(out, ref)
    # the guidance branch matters: without it the result differs
    plain = sample(adapter_from_pipeline(sd_pipe, Conditioning(prompts=PROMPTS)), noise, table.sigmas, "euler")
    assert (plain - ref).abs().max() > 1e-2


def test_sd_negative_prompt_is_the_pipelines(sd_pipe):
    cond = Conditioning(prompts=PROMPTS, negative="cat", guidance=3.0)
    adapter = adapter_from_pipeline(sd_pipe, cond)
    table = vp_table(adapter, (999.0, 601.0, 201.0, 11.0), solver="ddim")
    noise = adapter.noise(2, seed=4)
    kw = pipeline_kwargs(table, sd_pipe)
    try:
        ref = sd_pipe(list(PROMPTS), negative_prompt=["cat"] * 2, latents=pipeline_latents(sd_pipe, kw, noise),
                      guidance_scale=3.0, output_type="latent", height=16, width=16, **kw).images
    finally:
        remove_table(sd_pipe)
    assert_same(sample(adapter, noise, table.sigmas, table.solver), ref)


def test_sdxl_matches_the_pipeline_with_cfg(sdxl_pipe):
    adapter = adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=PROMPTS, guidance=5.0))
    assert sdxl_pipe.config.force_zeros_for_empty_prompt
    assert torch.count_nonzero(adapter.condition_kwargs.uncond["encoder_hidden_states"]) == 0  # zeros, as encode_prompt
    assert adapter.condition_kwargs.cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    table = vp_table(adapter, (999.0, 734.5, 402.0, 151.25, 21.0))
    ref, out, noise = prompt_pipeline_vs_stepsmith(sdxl_pipe, adapter, table, 5.0)
    assert adapter.calls == 5
    assert (ref - noise).abs().max() > 0.1
    assert_same(out, ref)


def test_dit_matches_the_pipeline_with_cfg(dit_pipe):
    from tests.tiny_pipelines import dit_final_latents

    labels = [207, 360]
    adapter = adapter_from_pipeline(dit_pipe, Conditioning(labels=tuple(labels), guidance=4.0))
    assert adapter.conditioning.null_label == 1000 and adapter.sample_shape == (4, 8, 8)
    sch = dit_pipe.scheduler
    sch.set_timesteps(5)
    table = table_from_timesteps(sch.timesteps.tolist(), adapter=adapter, solver="ddim", model="tiny-dit")
    assert table.sigmas[-1] == 0.0 and table.nfe == 5
    ref = dit_final_latents(dit_pipe, labels, 4.0, 5).chunk(2)[0]  # the pipeline carries [x; x] under CFG
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))  # the pipeline's randn_tensor
    out = sample(adapter, noise, table.sigmas, "ddim")
    assert adapter.calls == 5 and (ref - noise).abs().max() > 0.1
    assert_same(out, ref)


# ------------------------------------------------------------------ loading a pipeline folder


def test_load_model_from_a_saved_pipeline_folder(sd_pipe, sd_folder):
    cond = Conditioning(prompts=PROMPTS, negative="cat", guidance=7.5)
    loaded = load_model(str(sd_folder), conditioning=cond)
    assert loaded.calls == 0 and loaded.conditioning.negative == "cat"
    mem = adapter_from_pipeline(sd_pipe, cond)
    table = vp_table(mem, (999.0, 500.0, 100.0))
    noise = mem.noise(4, seed=1)
    torch.testing.assert_close(sample(loaded, noise, table.sigmas, "euler"), sample(mem, noise, table.sigmas, "euler"),
                               atol=0, rtol=0)  # the same weights, the same calls: bitwise


def test_micro_batches_give_the_same_samples(sd_pipe):
    adapter = adapter_from_pipeline(sd_pipe, Conditioning(prompts=PROMPTS, guidance=7.5))
    table = vp_table(adapter, (999.0, 500.0, 100.0))
    noise = adapter.noise(4, seed=2)
    whole = sample(adapter, noise, table.sigmas, "euler")
    parts = []
    for sl in (slice(0, 3), slice(3, 4)):  # sample 3 holds prompt 1 in a batch of one
        with bind(sl):
            parts.append(sample(adapter, noise[sl], table.sigmas, "euler"))
    # batches of 3 and 1 vs 4 run other CPU kernels: float32 gaps of ~1e-6 of the scale
    assert_same(torch.cat(parts), whole)
    unbound = sample(adapter, noise[3:4], table.sigmas, "euler")  # read as sample 0: prompt 0, not prompt 1
    assert (unbound - whole[3:4]).abs().max() > 1e-2
    assert (whole[0] - whole[1]).abs().max() > 1e-2  # different prompts, different samples


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("which,cond,options,match", [
    ("sd", None, {}, "--prompts"),
    ("sd", Conditioning(labels=(1,)), {}, "not class labels"),
    ("sd", Conditioning(prompts=PROMPTS, height=12, width=16), {}, "multiple of 8"),
    ("sd", Conditioning(prompts=PROMPTS), {"null_class": 3}, "takes no `null_class`"),
    ("sdxl", Conditioning(prompts=PROMPTS, height=16, width=20), {}, "multiple of 8"),
    ("dit", Conditioning(prompts=PROMPTS), {}, "not prompts"),
    ("dit", None, {}, "--classes"),
    ("dit", Conditioning(labels=(1000,)), {}, "out of range"),
    ("dit", Conditioning(labels=(3, 1001)), {}, "out of range"),
    ("dit", Conditioning(labels=(3,), height=32, width=32), {}, "16×16 images only"),
    ("dit", Conditioning(labels=(3,)), {"max_sequence_length": 8}, "takes no `max_sequence_length` .only SD3 and Flux"),
])
def test_bad_input_is_refused(request, which, cond, options, match):
    pipe = request.getfixturevalue(f"{which}_pipe")
    with pytest.raises(StepsmithError, match=match):
        adapter_from_pipeline(pipe, cond, **options)


def test_dit_null_class_option(dit_pipe):
    adapter = adapter_from_pipeline(dit_pipe, Conditioning(labels=(1, 2), guidance=2.0), null_class=999)
    assert adapter.conditioning.null_label == 999
    with pytest.raises(StepsmithError, match="out of range"):
        adapter_from_pipeline(dit_pipe, Conditioning(labels=(999,)), null_class=999)


def test_unregistered_pipeline_folder_and_missing_weights(sd_folder, tmp_path):
    other = tmp_path / "img2img"
    shutil.copytree(sd_folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(StepsmithError, match="StableDiffusionImg2ImgPipeline.*StableDiffusionPipeline.*register_pipeline"):
        load_model(str(other), conditioning=Conditioning(prompts=PROMPTS))
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(StepsmithError, match="safetensors"):
        load_model(str(broken), conditioning=Conditioning(prompts=PROMPTS))
    with pytest.raises(StepsmithError, match="--height"):
        load_model(str(sd_folder), shape="4,8,8", conditioning=Conditioning(prompts=PROMPTS))


# ------------------------------------------------------------------ the command line


def test_cli_sample_and_search_on_a_pipeline_folder(sd_folder, tmp_path, capsys):
    from PIL import Image

    from schedules.cli import main
    from schedules.io import load_safetensors

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\ncat cat\n")
    common = ["--model", str(sd_folder), "--prompts", str(prompts), "--negative-prompt", "cat", "--guidance", "7.5",
              "--height", "16", "--width", "16"]
    out, lat = tmp_path / "grid.png", tmp_path / "lat.safetensors"
    assert main(["sample", *common, "--nfe", "3", "--num", "4", "--out", str(out), "--save-tensor", str(lat)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_calls"] == 3 and report["conditioning"]["negative"] == "cat"
    assert report["conditioning"]["height"] == 16
    img = Image.open(out)
    assert img.mode == "RGB" and img.size == ((2 * 17 + 1) * 4, (2 * 17 + 1) * 4)  # 2 prompts × 2 images of 16×16
    assert load_safetensors(lat)["samples"].shape == (4, 4, 8, 8)  # the latents themselves
    table = tmp_path / "t.json"
    assert main(["search", *common, "--method", "uniform", "--nfe", "3", "--out", str(table)]) == 0
    assert json.loads(table.read_text())["nfe"] == 3
    capsys.readouterr()
    assert main(["search", *common, "--nfe", "2", "--samples", "2", "--grid", "6", "--no-progress",
                 "--out", str(table)]) == 0
    saved = json.loads(table.read_text())
    assert saved["conditioning"]["guidance"] == 7.5 and saved["conditioning"]["negative"] == "cat"
    assert (saved["conditioning"]["height"], saved["conditioning"]["width"]) == (16, 16)
    assert main(["sample", *common, "--height", "12", "--nfe", "2", "--num", "2", "--out", str(out)]) == 2
    assert "--height" in capsys.readouterr().err


def test_decoded_images_are_the_pipelines(sd_pipe):
    from schedules.cli_sample import decode_latents

    adapter = adapter_from_pipeline(sd_pipe, Conditioning(prompts=PROMPTS, guidance=7.5))
    table = vp_table(adapter, (999.0, 500.0))
    noise = adapter.noise(2, seed=5)
    kw = pipeline_kwargs(table, sd_pipe)
    try:
        images = sd_pipe(list(PROMPTS), latents=pipeline_latents(sd_pipe, kw, noise), guidance_scale=7.5,
                         output_type="pt", height=16, width=16, **kw).images
    finally:
        remove_table(sd_pipe)
    decoded = decode_latents(adapter, sample(adapter, noise, table.sigmas, "euler"))
    assert decoded.shape == images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, images, atol=1e-4, rtol=0)


def test_register_pipeline_hook_and_unregistered_objects():
    from schedules.pipeline_adapters import PIPELINE_ADAPTERS, register_pipeline

    class MyPipeline:
        pass

    with pytest.raises(StepsmithError, match="MyPipeline has no stepsmith adapter.*StableDiffusionPipeline.*register_pipeline"):
        adapter_from_pipeline(MyPipeline(), Conditioning(prompts=PROMPTS))
    seen = []
    register_pipeline("MyPipeline", lambda pipe, cond, *, name, **o: seen.append((type(pipe).__name__, cond.size, name, o)) or "adapter")
    try:
        assert adapter_from_pipeline(MyPipeline(), Conditioning(prompts=PROMPTS), size=3) == "adapter"
        assert seen == [("MyPipeline", 2, "MyPipeline", {"size": 3})]
    finally:
        PIPELINE_ADAPTERS.pop("MyPipeline")


def test_text_pipeline_without_transformers_is_refused(sd_folder, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a))
    with pytest.raises(StepsmithError, match=r"transformers.*stepsmith\[t2i\]"):
        load_model(str(sd_folder), conditioning=Conditioning(prompts=PROMPTS))
