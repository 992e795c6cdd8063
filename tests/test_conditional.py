"""Conditional models: Conditioning, the guided adapter, micro-batch alignment, tables and the CLI."""

import json
import warnings

import pytest
import torch

from schedules import TimestepTable, load_model, make_table, sample
from schedules.conditioning import (
    ConditionalAdapter,
    Conditioning,
    bind,
    bound_indices,
    micro_batches,
    parse_classes,
    with_guidance,
)
from schedules.conventions import prediction_to_x0
from schedules.io import StepsmithError
from schedules.teacher import Teacher, teacher_sample

from .test_adapters import TINY_UNET

N_EMBEDS = 4  # classes 0, 1, 2 and the null label 3


@pytest.fixture(scope="module")
def cond_folder(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("cond")
    net = UNet2DModel(**TINY_UNET, num_class_embeds=N_EMBEDS)
    with torch.no_grad():  # random class embeddings large enough that labels change the output clearly
        net.class_embedding.weight.mul_(20.0)
    net.save_pretrained(d / "unet")
    FlowMatchEulerDiscreteScheduler().save_config(d / "scheduler")
    return d


def _load(folder, classes=(0, 1, 2), w=2.0, **kw):
    return load_model(str(folder), conditioning=Conditioning(labels=classes, guidance=w), **kw)


def test_conditioning_indices_fingerprint_and_describe():
    c = Conditioning(labels=(4, 7, 9), null_label=10, guidance=3)
    assert c.labels_of(torch.arange(7)).tolist() == [4, 7, 9, 4, 7, 9, 4]
    assert c.fingerprint() == Conditioning(labels=[4, 7, 9], null_label=10, guidance=3.0).fingerprint()
    assert c.fingerprint() != c.with_guidance(1).fingerprint()
    assert c.describe()["classes"] == [4, 7, 9] and c.describe()["guidance"] == 3.0
    assert parse_classes("all") == "all" and parse_classes("0,2") == (0, 2)
    for bad in (-1, float("nan"), "3", True):
        with pytest.raises(StepsmithError, match="guidance"):
            Conditioning(labels=(0,), guidance=bad)
    with pytest.raises(StepsmithError, match="classes"):
        parse_classes("a,b")


def test_bind_composes_and_checks_lengths():
    assert bound_indices(3).tolist() == [0, 1, 2]
    with bind(slice(4, 8)):
        assert bound_indices(4).tolist() == [4, 5, 6, 7]
        with bind(slice(1, 3)):
            assert bound_indices(2).tolist() == [5, 6]
        with bind(torch.arange(4).repeat(2)):
            assert bound_indices(8).tolist() == [4, 5, 6, 7] * 2
        with pytest.raises(StepsmithError, match="bind"):
            bound_indices(5)
    assert [(s.start, s.stop) for s in micro_batches(7, 3)] == [(0, 3), (3, 6), (6, 7)]


def test_guided_output_is_one_batched_call(cond_folder):
    m = _load(cond_folder, w=2.5)
    assert isinstance(m, ConditionalAdapter) and m.conditioning.null_label == N_EMBEDS - 1
    sizes = []
    m.module.register_forward_pre_hook(lambda _mod, args: sizes.append(args[0].shape[0]))
    x, s = m.noise(5, 0), torch.full((5,), 0.6)
    m.calls = 0
    d = m.denoise(x, s)
    assert m.calls == 1 and sizes == [10]  # CFG doubles the batch, not the calls
    t = m.convention.model_time(s.double()).float()
    labels = m.conditioning.labels_of(torch.arange(5))
    with torch.no_grad():
        o_c = m.module(x, t, class_labels=labels).sample
        o_u = m.module(x, t, class_labels=torch.full((5,), 3)).sample
    expect = prediction_to_x0(m.convention, "flow", x, s.view(-1, 1, 1, 1), o_u + 2.5 * (o_c - o_u))
    assert torch.allclose(d, expect, atol=1e-5)
    m1 = with_guidance(m, 1.0)
    sizes.clear()
    m1.denoise(x, s)
    assert sizes == [5]  # w = 1 skips the unconditional half
    assert not torch.allclose(m1.denoise(x, s), d, atol=1e-3)


def test_teacher_micro_batches_keep_conditions(cond_folder):
    m = _load(cond_folder)
    noise = m.noise(7, 1)
    teacher = Teacher("heun", 6)
    whole = teacher_sample(m, noise, teacher).x
    parts = teacher_sample(m, noise, teacher, batch_size=3).x
    assert torch.allclose(whole, parts, atol=1e-5)
    # samples 4..6 bound as 4..6 match; bound as 0..2 (conditions 0, 1, 2 instead of 1, 2, 0) they differ
    with bind(slice(4, 7)):
        assert torch.allclose(teacher_sample(m, noise[4:7], teacher).x, whole[4:], atol=1e-5)
    wrong = teacher_sample(m, noise[4:7], teacher).x
    assert not torch.allclose(wrong, whole[4:], atol=1e-3)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_dp_search_micro_batch_3_equals_one_batch(cond_folder, solver):
    m = _load(cond_folder)
    opts = dict(samples=7, seed=0, grid=8, mode="teacher")
    a = make_table(m, "dp", 3, solver, micro_batch=3, **opts)
    b = make_table(m, "dp", 3, solver, micro_batch=64, **opts)
    assert a.sigmas == b.sigmas
    assert a.objective == pytest.approx(b.objective, rel=1e-4)  # float32 convolutions vary with batch size
    assert a.conditioning == b.conditioning == m.conditioning.describe()


def test_evolution_and_ays_run_on_a_conditional_model(cond_folder):
    m = _load(cond_folder)
    t = make_table(m, "evolution", 3, samples=18, grid=8, population=4, generations=2, elite=2)
    assert t.conditioning["guidance"] == 2.0
    t2 = make_table(m, "ays", 3, samples=5, teacher_steps=8, max_sweeps=1, candidates=3)
    assert t2.conditioning["fingerprint"] == m.conditioning.fingerprint()


def test_label_and_model_errors(cond_folder, flow_folder_cond_free):
    with pytest.raises(StepsmithError, match="out of range"):
        _load(cond_folder, classes=(0, 7))
    with pytest.raises(StepsmithError, match="null label 3|null class 3"):
        _load(cond_folder, classes=(3,))
    with pytest.raises(StepsmithError, match="null class 9"):
        _load(cond_folder, null_class=9)
    with pytest.raises(StepsmithError, match="class-conditional"):
        load_model(str(cond_folder))
    with pytest.raises(StepsmithError, match="unconditional"):
        _load(flow_folder_cond_free)
    m = load_model(str(cond_folder), conditioning=Conditioning(labels="all", guidance=1.0), null_class=0)
    assert m.conditioning.labels == (1, 2, 3) and m.conditioning.null_label == 0


@pytest.fixture(scope="module")
def flow_folder_cond_free(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    d = tmp_path_factory.mktemp("uncond")
    UNet2DModel(**TINY_UNET).save_pretrained(d / "unet")
    FlowMatchEulerDiscreteScheduler().save_config(d / "scheduler")
    return d


def test_table_conditioning_block_round_trip_and_warning(cond_folder, tmp_path):
    m = _load(cond_folder, w=2.0)
    t = make_table(m, "dp", 2, samples=4, grid=6, mode="teacher")
    t.save(tmp_path / "t.json")
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["conditioning"]["guidance"] == 2.0 and list(d)[-1] == "conditioning"
    from schedules.table import load_table

    back = load_table(tmp_path / "t.json")
    assert back.conditioning == t.conditioning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert back.check_conditioning(m.conditioning) is None
    with pytest.warns(UserWarning, match="guidance 2"):
        back.check_conditioning(m.conditioning.with_guidance(4.0))
    from schedules.search import make_tables

    shared = make_tables(m, "dp", [2, 3], samples=4, grid=6, mode="teacher")  # one shared DP pass
    assert [tb.conditioning for tb in shared.values()] == [t.conditioning, t.conditioning]
    base = make_table(m, "karras", 2)  # baselines do not depend on the conditioning
    assert base.conditioning is None and "conditioning" not in base.to_dict()
    with pytest.raises(StepsmithError, match="conditioning"):
        TimestepTable.from_dict({**base.to_dict(), "conditioning": "w=3"})


def test_sampling_is_reproducible_per_sample(cond_folder):
    m = _load(cond_folder)
    sig = [1.0, 0.5, 0.0]
    full = sample(m, m.noise(6, 3), sig, "euler")
    with bind(slice(3, 6)):
        tail = sample(m, m.noise(6, 3)[3:], sig, "euler")
    assert torch.allclose(full[3:], tail, atol=1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_search_then_sample_conditional(cond_folder, tmp_path, capsys):
    from PIL import Image

    from schedules.cli import main

    table = tmp_path / "t.json"
    assert main(["search", "--model", str(cond_folder), "--classes", "0,1,2", "--guidance", "2", "--nfe", "2",
                 "--samples", "6", "--grid", "6", "--option", "mode=teacher", "--no-progress", "--out", str(table)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["conditioning"]["classes"] == [0, 1, 2]
    out = tmp_path / "g.png"
    assert main(["sample", "--model", str(cond_folder), "--classes", "0,1,2", "--guidance", "3", "--table",
                 str(table), "--num", "7", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "warning: the table was searched for guidance 2" in cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["model_calls"] == 2
    img = Image.open(out)
    # 3 rows (classes) of 3 images of 8 px, 1 px padding, upscaled 4x
    assert img.size == (4 * (3 * 9 + 1), 4 * (3 * 9 + 1))


@pytest.mark.parametrize("extra,match", [
    (["--classes", "0,1", "--guidance", "-1"], "--guidance"),
    (["--classes", "0,9"], "out of range"),
    ([], "class-conditional"),
    (["--guidance", "3"], "class-conditional"),
    (["--classes", "0", "--null-class", "7"], "--null-class"),
])
def test_cli_conditional_errors_exit_2_nothing_written(cond_folder, tmp_path, capsys, extra, match):
    from schedules.cli import main

    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(cond_folder), "--nfe", "2", "--num", "2", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not out.exists()


@pytest.mark.parametrize("extra,match", [
    (["--classes", "0"], "unconditional"),
    (["--guidance", "2"], "unconditional"),
    (["--prompts", "PROMPTS"], "unconditional"),
    (["--prompts", "MISSING"], "does not exist; it takes a text file of prompts, one a line, not the prompt itself"),
])
def test_cli_unconditional_refuses_conditions(flow_folder_cond_free, tmp_path, capsys, extra, match):
    from schedules.cli import main

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    extra = [{"PROMPTS": str(tmp_path / "p.txt"), "MISSING": str(tmp_path / "none.txt")}.get(v, v) for v in extra]
    out = tmp_path / "t.json"
    rc = main(["search", "--model", str(flow_folder_cond_free), "--method", "uniform", "--nfe", "2", *extra,
               "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err and not out.exists()


# --------------------------------------------------------------------------- the embedded model


def test_builtin_digits_cond_and_its_pipeline_match():
    from schedules import pipeline_kwargs
    from schedules.embedded import embedded_path
    from schedules.embedded.cond_pipeline import ClassConditionalFlowMatchPipeline

    with pytest.raises(StepsmithError, match="class-conditional"):
        load_model("builtin:digits-cond")
    m = load_model("builtin:digits-cond", conditioning=Conditioning(labels="all", guidance=3))
    assert m.conditioning.labels == tuple(range(10)) and m.conditioning.null_label == 10
    t = make_table(m, "karras", 4)
    noise = m.noise(3, 0)
    x = sample(m, noise, t.sigmas, "euler")
    pipe = ClassConditionalFlowMatchPipeline.from_pretrained(embedded_path("digits-cond"))
    pipe.set_progress_bar_config(disable=True)
    y = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, latents=noise, output_type="latent",
             **pipeline_kwargs(t, pipe)).images
    assert torch.allclose(x, y, atol=1e-5)
    with pytest.raises(StepsmithError, match="null label"):
        pipe(class_labels=[10])


@pytest.mark.filterwarnings("ignore:N=12 generated")
def test_eval_sweep_class_accuracy_same_conditions_for_every_micro_batch(tmp_path):
    from eval.sweep import run_sweep

    m = load_model("builtin:digits-cond", conditioning=Conditioning(labels=(1, 7), guidance=3))
    kw = dict(methods=["uniform"], nfe=[3], num=12, metric="fid,class-accuracy", teacher=False, grid=0,
              cache=str(tmp_path), progress=False)
    a = run_sweep(m, batch_size=5, **kw)
    b = run_sweep(m, batch_size=12, **kw)
    ra, rb = a["results"][0], b["results"][0]
    assert ra["metrics"]["class-accuracy"] == rb["metrics"]["class-accuracy"]
    assert ra["metrics"]["fid"] == pytest.approx(rb["metrics"]["fid"], rel=1e-4)
    assert ra["model_calls"] == 3 * 3  # 3 micro-batches x NFE 3: guidance does not double the calls
    assert a["model_info"]["conditioning"]["classes"] == [1, 7]
    unc = load_model("builtin:digits-flow")
    with pytest.raises(StepsmithError, match="unconditional"):
        run_sweep(unc, **{**kw, "num": 4})


def test_dit_and_text_pipelines_get_a_clear_not_supported_error(tmp_path):
    from diffusers import DDIMScheduler

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]}))  # DiTPipeline itself has an adapter (test_pipeline_adapters)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    DDIMScheduler().save_config(tmp_path / "scheduler")
    with pytest.raises(StepsmithError, match="PixArtAlphaPipeline pipeline with a DiTTransformer2DModel is not supported"
                                             ".*UNet2DModel.*DiTPipeline.*register_pipeline"):
        load_model(str(tmp_path), conditioning=Conditioning(labels=(0,), guidance=4))


def test_a_mismatch_names_the_recorded_settings_that_differ():
    from schedules.conditioning import conditioning_mismatch

    searched = Conditioning(prompts=("a cat",), negative="dog", guidance=3.0, height=16, width=16,
                            extra={"max_sequence_length": 256})
    block = searched.describe()
    assert conditioning_mismatch(block, searched) is None
    msg = conditioning_mismatch(block, Conditioning(prompts=("a cat",), negative="dog", guidance=3.0, height=16,
                                                     width=32, extra={"max_sequence_length": 512}))
    assert msg == "the table was searched for max_sequence_length 256 (this run: 512); width 16 (this run: 32)"
    msg = conditioning_mismatch(block, Conditioning(prompts=("a cat",), negative="bird", guidance=3.0, height=16,
                                                     width=16, extra={"max_sequence_length": 256}))
    assert msg == "the table was searched for negative 'dog' (this run: 'bird')"
    other = Conditioning(prompts=("a cat", "a dog"), negative="bird", guidance=3.0, height=16, width=16,
                         extra={"max_sequence_length": 256})  # the prompts differ too: only the fingerprint says so
    assert conditioning_mismatch(block, other) == ("the table was searched for negative 'dog' (this run: 'bird'); "
                                                   f"another condition set (fingerprint {block['fingerprint']} vs "
                                                   f"{other.fingerprint()})")
    msg = conditioning_mismatch(Conditioning(labels=(0, 1), guidance=2.0).describe(),
                                Conditioning(labels=(0, 1, 2), guidance=2.0))
    assert msg == "the table was searched for classes [0, 1] (this run: [0, 1, 2])"
