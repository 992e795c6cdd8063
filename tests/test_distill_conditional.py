"""Conditional distillation: guided teacher data with per-sample conditions, the guided student, C²OT pairs,
LoRA on pipeline denoisers exported as a pipeline folder and as ``load_lora_weights`` weights, CLI and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from distill.base import Batch, TeacherPairs, straightening_loss
from distill.boss import BOSSStraightening
from distill.data import generate_teacher_data
from distill.export import load_distilled
from distill.trainer import DistillConfig, distill
from schedules.adapters import load_model
from schedules.baselines import uniform
from schedules.cli import main as cli_main
from schedules.conditioning import ConditionalAdapter, Conditioning, bind
from schedules.couplings import Coupling
from schedules.io import StepsmithError
from schedules.solvers import sample
from schedules.teacher import teacher_sample

torch.set_num_threads(1)

LABELS = (1, 4, 7)
FAST = dict(teacher_steps=6, progress=False, log_every=5, eval_every=1000, warmup=1)


@pytest.fixture(scope="module")
def cond3():
    """builtin:digits-cond on three classes at guidance 3."""
    return load_model("builtin:digits-cond", conditioning=Conditioning(labels=LABELS, guidance=3.0))


def test_teacher_data_are_guided_trajectories_under_each_samples_condition(cond3):
    table = uniform(cond3, 2)
    data = generate_teacher_data(cond3, [table], 7, teacher_steps=6, batch_size=3)  # micro-batches of 3
    assert data.conditions.tolist() == [i % 3 for i in range(7)]
    assert data.conditioning["guidance"] == 3.0 and data.conditioning["classes"] == list(LABELS)
    one = generate_teacher_data(cond3, [table], 7, teacher_steps=6, batch_size=7)
    torch.testing.assert_close(data.states, one.states)  # micro-batching keeps conditions aligned
    # trajectory 5 alone (condition 5 mod 3 = 2, label 7) is the guided teacher run on its own noise
    from distill.data import distill_teacher

    teacher = distill_teacher(cond3, data.nodes, 6, "heun")
    with bind([5]):
        run = teacher_sample(cond3, data.noise[5:6], teacher, nodes=data.nodes)
    torch.testing.assert_close(run.states[:, 0].float(), data.states[5])
    # the guidance is baked in: at w = 1 the same noises give other samples
    w1 = generate_teacher_data(load_model("builtin:digits-cond", conditioning=Conditioning(labels=LABELS)), [table], 7,
                               teacher_steps=6)
    assert torch.equal(w1.noise, data.noise) and not torch.allclose(w1.final, data.final, atol=1e-3)
    assert w1.fingerprint != data.fingerprint


def test_teacher_data_conditions_survive_the_cache(cond3, tmp_path):
    data = generate_teacher_data(cond3, [uniform(cond3, 1)], 5, teacher_steps=4)
    data.save(tmp_path / "t.safetensors")
    back = type(data).load(tmp_path / "t.safetensors")
    assert torch.equal(back.conditions, data.conditions) and back.conditioning == data.conditioning


def test_boss_student_learns_the_guided_jumps_of_each_condition(cond3, tmp_path):
    table = uniform(cond3, 2)
    cfg = DistillConfig(method="boss", steps=30, pairs=40, batch_size=16, lr=3e-4, ema_decay=0, **FAST)
    res = distill(cond3, table, cfg, tmp_path / "out")
    assert res.info["final_val_loss"] < 0.6 * res.history[0]["val_loss"]
    student = load_distilled(tmp_path / "out")  # back under the conditioning it was trained at
    assert isinstance(student, ConditionalAdapter) and student.conditioning.guidance == 3.0
    assert student.conditioning.labels == LABELS
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["conditioning"]["guidance"] == 3.0
    # along the table, the student lands closer to the guided teacher than the teacher itself (held-out seeds)
    held = generate_teacher_data(cond3, [table], 30, seed=777, teacher_steps=6)
    with torch.no_grad():
        xs = sample(student, held.noise, table.sigmas, "euler")
        xt = sample(cond3, held.noise, table.sigmas, "euler")
    err = lambda x: float(((x - held.final) ** 2).mean())  # noqa: E731
    assert err(xs) < 0.8 * err(xt)
    # the student was trained on (x, τ, condition): the right conditions fit better than shifted ones
    method = BOSSStraightening(held, [table], cond3.convention)
    val = method.validation()
    wrong = Batch(val.x, val.s, val.slope, (val.cond + 1) % 3)
    with torch.no_grad():
        assert float(straightening_loss(student, val)) < float(straightening_loss(student, wrong))


def test_reflow_pairs_keep_the_condition_of_their_sample_and_c2ot_never_crosses_conditions():
    torch.manual_seed(0)
    n = 300
    cond = torch.arange(n) % 3
    final = torch.randn(n, 2) * 0.3 + torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0]])[cond]
    noise = torch.randn(n, 2)
    row = {tuple(v.tolist()): int(c) for v, c in zip(final, cond)}
    costs = {}
    for kind in ("independent", "ot", "c2ot"):
        pairs = TeacherPairs(noise, final, Coupling(kind, ot_batch=60), cond)
        z0, x1, c = pairs.draw_conditioned(torch.Generator().manual_seed(3), 120)
        assert c.tolist() == [row[tuple(v.tolist())] for v in x1]  # each pair trained under its sample's condition
        costs[kind] = float(((z0 - x1) ** 2).sum(1).mean())
        zf, xf, cf = pairs.fixed_conditioned()
        assert torch.equal(zf, noise) and cf.tolist() == [row[tuple(v.tolist())] for v in xf]
    assert costs["ot"] < costs["c2ot"] < costs["independent"]
    # C²OT: within each OT batch, the noises a class receives are the ones drawn beside that class's samples
    gen = torch.Generator().manual_seed(3)
    tz = torch.randint(0, n, (120,), generator=gen)
    tx = torch.randint(0, n, (120,), generator=gen)
    z0, x1, c = TeacherPairs(noise, final, Coupling("c2ot", ot_batch=60), cond).draw_conditioned(
        torch.Generator().manual_seed(3), 120)
    assert torch.equal(z0, noise[tz]) and torch.equal(c, cond[tx])
    with pytest.raises(StepsmithError) as exc:
        TeacherPairs(noise, final, Coupling("c2ot"))  # no conditions
    assert exc.value.param == "coupling"


@pytest.mark.parametrize("method", ["reflow", "kstep"])
def test_c2ot_reflow_and_kstep_run_on_a_conditional_model(cond3, method):
    cfg = DistillConfig(method=method, coupling="c2ot", ot_batch=12, steps=3, pairs=30, batch_size=12, **FAST)
    res = distill(cond3, uniform(cond3, 2), cfg)
    assert res.info["method"]["coupling"] == "c2ot" and res.info["conditioning"]["classes"] == list(LABELS)


def test_c2ot_refused_for_an_unconditional_model_before_any_work(tmp_path):
    toy = load_model("builtin:toy2d-flow")
    cfg = DistillConfig(method="reflow", coupling="c2ot", steps=2, pairs=20, batch_size=8, **FAST)
    with pytest.raises(StepsmithError) as exc:
        distill(toy, uniform(toy, 1), cfg, tmp_path / "out")
    assert exc.value.param == "coupling" and not (tmp_path / "out").exists()
    assert not (tmp_path / "out.work").exists()
    DistillConfig(method="reflow", coupling="c2ot").validate(conditional=True)  # a conditional model may


def test_cli_distills_a_class_conditional_model_with_guidance(cond3, tmp_path, capsys):
    uniform(cond3, 2).save(tmp_path / "t.json")
    base = ["distill", "--model", "builtin:digits-cond", "--classes", "1,4,7", "--guidance", "3", "--table",
            str(tmp_path / "t.json"), "--steps", "2", "--pairs", "10", "--teacher-steps", "4", "--batch-size", "4",
            "--no-progress"]
    assert cli_main([*base, "--out", str(tmp_path / "boss")]) == 0
    info = json.loads((tmp_path / "boss" / "distill.json").read_text())
    assert info["conditioning"]["guidance"] == 3.0 and info["load"]["conditioning"]["classes"] == list(LABELS)
    student = load_distilled(tmp_path / "boss")
    assert student.conditioning.guidance == 3.0 and student.module.config.num_class_embeds == 11
    # the folder loads as a model under the conditioning its student was trained under, and its table says so
    folder = load_model(str(tmp_path / "boss"))
    assert folder.conditioning.describe() == student.conditioning.describe()
    assert json.loads((tmp_path / "boss" / "table.json").read_text())["conditioning"] == folder.conditioning.describe()
    capsys.readouterr()
    sample = ["sample", "--model", str(tmp_path / "boss"), "--table", str(tmp_path / "boss" / "table.json"), "--num",
              "3", "--no-progress", "--out", str(tmp_path / "s.png")]
    assert cli_main(sample) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["conditioning"]["guidance"] == 3.0 and out.err == ""  # the student's own setting
    assert cli_main([*sample, "--guidance", "5"]) == 0  # --guidance alone re-guides the student's condition set
    out = capsys.readouterr()
    assert json.loads(out.out)["conditioning"]["classes"] == list(LABELS)
    assert json.loads(out.out)["conditioning"]["guidance"] == 5.0 and "guidance 3 (this run: 5)" in out.err
    assert cli_main([*base, "--method", "reflow", "--coupling", "c2ot", "--out", str(tmp_path / "c2ot")]) == 0
    capsys.readouterr()
    # bad input: a class constraint on an unconditional model — one line, exit 2, nothing written
    uniform(load_model("builtin:toy2d-flow"), 1).save(tmp_path / "toy.json")
    rc = cli_main(["distill", "--model", "builtin:toy2d-flow", "--table", str(tmp_path / "toy.json"), "--steps", "2",
                   "--method", "reflow", "--coupling", "c2ot", "--pairs", "10", "--no-progress",
                   "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--coupling" in err and "unconditional" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.work").exists()


# ------------------------------------------------------------------ pipeline models: LoRA on the UNet / transformer


def _unet_out(unet, x, t, e):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=e).sample


def test_sd_lora_student_loads_into_a_fresh_pipeline(sd_folder, tmp_path, capsys):
    """``stepsmith distill --prompts ... --lora-rank``: the LoRA weights load into the original pipeline and give
    the exported (fused) student's UNet."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    teacher = load_model(str(sd_folder), conditioning=Conditioning(prompts=("a cat", "a dog"), guidance=3.0))
    uniform(teacher, 2).save(tmp_path / "t.json")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    out = tmp_path / "sd-lora"
    capsys.readouterr()
    assert cli_main(["distill", "--model", str(sd_folder), "--prompts", str(tmp_path / "prompts.txt"), "--guidance", "3",
                     "--table", str(tmp_path / "t.json"), "--steps", "4", "--pairs", "8", "--teacher-steps", "6",
                     "--batch-size", "4", "--lora-rank", "2", "--lora-alpha", "4", "--lr", "1e-2", "--ema-decay", "0",
                     "--warmup", "1", "--no-progress", "--out", str(out)]) == 0
    assert "Loading pipeline components" not in capsys.readouterr().err  # --no-progress: diffusers' bars too
    info = json.loads((out / "distill.json").read_text())
    assert info["trainable_parameters"] < info["parameters"] and info["load"]["lora"] == "lora"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    exported = DiffusionPipeline.from_pretrained(out)  # the fused student, a pipeline folder
    fresh = StableDiffusionPipeline.from_pretrained(sd_folder)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(out / "lora"))
    torch.manual_seed(0)
    x, t, e = torch.randn(2, *teacher.sample_shape), torch.tensor([700, 200]), torch.randn(2, 16, 32)
    lora_out, student_out = _unet_out(fresh.unet, x, t, e), _unet_out(exported.unet, x, t, e)
    torch.testing.assert_close(lora_out, student_out, atol=1e-5, rtol=1e-4)
    assert (lora_out - _unet_out(teacher.module, x, t, e)).abs().max() > 1e-3
    student = load_distilled(out)  # under the prompts and guidance it was trained at
    assert student.conditioning.prompts == ("a cat", "a dog") and student.conditioning.guidance == 3.0
    torch.testing.assert_close(_unet_out(student.module, x, t, e), student_out)


def test_lora_export_refused_for_dit_before_any_work(dit_pipe, tmp_path, capsys):
    folder = tmp_path / "dit"
    dit_pipe.save_pretrained(folder, safe_serialization=True)
    teacher = load_model(str(folder), conditioning=Conditioning(labels=(0, 1), guidance=2.0))
    uniform(teacher, 1).save(tmp_path / "t.json")
    rc = cli_main(["distill", "--model", str(folder), "--classes", "0,1", "--guidance", "2", "--table",
                   str(tmp_path / "t.json"), "--steps", "2", "--pairs", "4", "--lora-rank", "2", "--no-progress",
                   "--out", str(tmp_path / "out")])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip() and "Loading pipeline" not in ln]
    assert rc == 2 and len(err) == 1 and "--lora-rank" in err[0] and "DiTPipeline" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_sd3_lora_student_from_a_python_pipeline(sd3_pipe, vocab_dir, tmp_path):
    """A transformer pipeline built in Python: the student's guided output equals the fresh pipeline's with the
    exported LoRA loaded, and the output folder is the pipeline with the fused transformer."""
    from schedules.pipeline_adapters import adapter_from_pipeline
    from tests.tiny_pipelines import sd3_pipeline

    cond = Conditioning(prompts=("a cat", "a dog"), guidance=3.0)
    teacher = adapter_from_pipeline(sd3_pipe, cond, name="tiny-sd3")
    cfg = DistillConfig(method="boss", steps=3, pairs=8, batch_size=4, lora_rank=2, lr=1e-2, ema_decay=0, **FAST)
    out = tmp_path / "sd3-lora"
    res = distill(teacher, uniform(teacher, 2), cfg, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and (out / "transformer" / "config.json").is_file()
    fresh = sd3_pipeline(vocab_dir)
    fresh.load_lora_weights(str(out / "lora"))
    loaded = adapter_from_pipeline(fresh, cond, name="tiny-sd3")
    torch.manual_seed(1)
    x, s = torch.randn(3, *teacher.sample_shape), torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    with torch.no_grad():
        a, b, c = loaded.model_output(x, s), res.adapter.model_output(x, s), teacher.model_output(x, s)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (a - c).abs().max() > 1e-4


def test_conditional_run_resumes_only_under_the_same_guidance(cond3, tmp_path):
    from schedules.conditioning import with_guidance

    table = uniform(cond3, 1)
    cfg = DistillConfig(method="boss", steps=4, pairs=10, batch_size=4, checkpoint_every=2, **FAST)
    full = distill(cond3, table, cfg)
    assert distill(cond3, table, cfg, tmp_path / "out", stop_after=2) is None
    with pytest.raises(StepsmithError, match="cannot resume.*guidance"):
        distill(with_guidance(cond3, 1.0), table, cfg, tmp_path / "out", resume=True)
    res = distill(cond3, table, cfg, tmp_path / "out", resume=True)
    for k, v in full.module.state_dict().items():
        torch.testing.assert_close(res.module.state_dict()[k], v)


def test_sdxl_record_keeps_a_missing_negative_prompt_missing(sdxl_pipe, tmp_path):
    """SDXL under ``force_zeros_for_empty_prompt`` guides a missing negative prompt by zeros, an explicit "" by its
    encoding: the export records the conditioning as requested (no negative), so the student loaded back guides by
    zeros like its teacher did."""
    from schedules.pipeline_adapters import adapter_from_pipeline

    teacher = adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=("a cat", "a dog"), guidance=3.0), name="tiny-sdxl")
    assert teacher.conditioning.negative == "" and teacher.conditioning.extra["negative_embeds"] == "zeros"
    cfg = DistillConfig(method="boss", steps=2, pairs=4, batch_size=4, ema_decay=0, **FAST)
    out = tmp_path / "sdxl"
    distill(teacher, uniform(teacher, 1), cfg, out)
    rec = json.loads((out / "distill.json").read_text())["load"]["conditioning"]
    assert rec["negative"] is None and rec["prompts"] == ["a cat", "a dog"] and rec["guidance"] == 3.0
    student = load_distilled(out)
    assert student.conditioning.extra.get("negative_embeds") == "zeros"
    assert student.conditioning.fingerprint() == teacher.conditioning.fingerprint()
    # the explicit "" is another negative branch: it would not have been the teacher's
    explicit = adapter_from_pipeline(sdxl_pipe, Conditioning(prompts=("a cat", "a dog"), negative="", guidance=3.0))
    assert explicit.conditioning.fingerprint() != student.conditioning.fingerprint()
