"""Distillation trainer: BOSS / reflow / k-step through the adapter, outputs, resume, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
import torch
from torch import nn

from distill.base import ode_velocity, straight_path
from distill.cli import config_from_args
from distill.data import generate_teacher_data
from distill.export import load_distilled
from distill.student import make_ema
from distill.trainer import DistillConfig, build_method, distill
from schedules.adapters import ModelAdapter, load_model
from schedules.baselines import uniform
from schedules.cli import build_parser
from schedules.cli import main as cli_main
from schedules.conventions import FlowConvention, VPConvention
from schedules.embedded.nets import Toy2DVelocity
from schedules.io import StepsmithError, load_safetensors
from schedules.solvers import ode_derivative, sample
from schedules.table import TimestepTable

torch.set_num_threads(1)

FAST = dict(pairs=200, teacher_steps=20, batch_size=128, lr=1e-3, warmup=10, progress=False, log_every=10,
            eval_every=20)


@pytest.fixture(scope="module")
def toy():
    return load_model("builtin:toy2d-flow")


def _final_error(adapter, teacher, table, n=400):
    z = teacher.noise(n, 10_000)
    data = generate_teacher_data(teacher, [table], n, seed=10_000, teacher_steps=20, val_fraction=0.1)
    x = sample(adapter, z, table.sigmas, "euler")
    assert torch.equal(data.noise, z)
    return float(((x - data.final) ** 2).sum(1).mean())


def test_boss_straightens_toy2d(toy):
    table = uniform(toy, 2)
    res = distill(toy, table, DistillConfig(method="boss", steps=150, **FAST))
    before = _final_error(toy, toy, table)
    after = _final_error(res.adapter, toy, table)
    assert after < 0.5 * before, (before, after)
    # the validation loss went down during training and the teacher's module is untouched
    assert res.history[-1]["val_loss"] < 0.5 * res.history[0]["val_loss"]
    assert any(not torch.equal(p, q) for p, q in zip(res.module.parameters(), toy.module.parameters()))
    assert toy.module.training is False


class _TinyVP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None] / 1000], dim=1))


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_vp_velocity_is_the_solver_derivative(prediction):
    torch.manual_seed(0)
    ad = ModelAdapter(module=_TinyVP(), convention=VPConvention.default(), prediction=prediction,
                      sample_shape=(2,), name="tiny")
    x = torch.randn(5, 2) * 3
    for s in (0.05, 1.0, 40.0):
        sv = torch.full((5,), s)
        d = ode_velocity(ad, x, sv)
        ref = ode_derivative(ad.convention, x, s, ad.denoise(x, sv))
        torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-4)
    # gradients flow through the adapter
    ode_velocity(ad, x, torch.full((5,), 1.0)).sum().backward()
    assert ad.module.net[0].weight.grad is not None


def test_boss_on_vp_model_lands_on_teacher_nodes():
    torch.manual_seed(0)
    ad = ModelAdapter(module=_TinyVP().eval(), convention=VPConvention.default(), prediction="v",
                      sample_shape=(2,), name="tiny-vp")
    table = uniform(ad, 3)
    res = distill(ad, table, DistillConfig(method="boss", steps=120, **FAST))
    assert res.history[-1]["val_loss"] < 0.9 * res.history[0]["val_loss"]
    data = generate_teacher_data(ad, [table], 200, seed=10_000, teacher_steps=20)
    err = lambda a: float(((sample(a, data.noise, table.sigmas) - data.final) ** 2).sum(1).mean())  # noqa: E731
    assert err(res.adapter) < err(ad)


def test_straight_path_endpoints_and_kstep_grid(toy):
    z0, x1 = torch.randn(4, 2), torch.randn(4, 2)
    for conv, s_max in ((FlowConvention(), 1.0), (VPConvention.default(), VPConvention.default().sigma_max)):
        x, slope = straight_path(conv, z0, x1, torch.full((4,), s_max, dtype=torch.float64), s_max)
        torch.testing.assert_close(x, z0, rtol=1e-4, atol=1e-4)
        s = torch.full((4,), 1e-9, dtype=torch.float64)
        torch.testing.assert_close(straight_path(conv, z0, x1, s, s_max)[0], x1, rtol=1e-4, atol=1e-4)
    table = uniform(toy, 4)
    data = generate_teacher_data(toy, [table], 20, teacher_steps=10)
    kstep = build_method("kstep", data, [table], toy)
    assert kstep.grid.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])
    b = kstep.draw(torch.Generator().manual_seed(0), 64)
    assert set(b.s.tolist()) <= {1.0, 0.75, 0.5, 0.25}
    boss = build_method("boss", data, [table], toy)
    b = boss.validation()
    # one Euler step with the target slope lands exactly on the teacher's next node
    assert len(b) == data.n_val * 4
    reflow = build_method("reflow", data, [table], toy)
    s = reflow.draw(torch.Generator().manual_seed(1), 1000).s
    assert 0 < s.min() and s.max() <= 1 and abs(float(s.mean()) - 0.5) < 0.05


@pytest.mark.parametrize("method", ["reflow", "kstep"])
def test_baselines_reduce_their_loss(toy, method):
    res = distill(toy, uniform(toy, 2), DistillConfig(method=method, steps=80, **FAST))
    assert res.history[0]["step"] == 0
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"]


def test_lora_output_folder_roundtrip(toy, tmp_path):
    table = uniform(toy, 2)
    out = tmp_path / "straight"
    cfg = DistillConfig(method="boss", steps=30, lora_rank=2, **FAST)
    res = distill(toy, table, cfg, out)
    assert res.info["trainable_parameters"] < 0.1 * res.info["parameters"]
    state = load_safetensors(out / "model.safetensors")
    fresh = Toy2DVelocity()
    fresh.load_state_dict(state)  # full state dict, LoRA merged
    assert set(state) == set(toy.module.state_dict())
    assert any(not torch.equal(state[k], v) for k, v in toy.module.state_dict().items())
    assert json.loads((out / "table.json").read_text())["sigmas"] == table.sigmas
    assert (out / "loss.log").read_text().startswith("step\tloss")
    student = load_distilled(out)
    x = torch.randn(3, 2)
    torch.testing.assert_close(student.denoise(x, torch.full((3,), 0.5)), res.adapter.denoise(x, torch.full((3,), 0.5)))
    assert not out.with_name(out.name + ".work").exists()
    with pytest.raises(StepsmithError, match="--overwrite"):
        distill(toy, table, cfg, out)
    distill(toy, table, dataclasses.replace(cfg, steps=5), out, overwrite=True)
    assert json.loads((out / "distill.json").read_text())["config"]["steps"] == 5


def test_diffusers_pipeline_output(tmp_path):
    import diffusers

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 layers_per_block=1, norm_num_groups=4)
    pipe = tmp_path / "pipe"
    unet.save_pretrained(pipe / "unet")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0).save_config(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "UnconditionalFlowMatchPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "unet": ["diffusers", "UNet2DModel"]}))
    teacher = load_model(str(pipe))
    table = uniform(teacher, 2)
    cfg = DistillConfig(method="boss", steps=3, pairs=20, teacher_steps=4, batch_size=8, progress=False, lr=1e-2)
    out = tmp_path / "out"
    distill(teacher, table, cfg, out)
    student = load_model(str(out))
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "table.json").is_file()
    a, b = teacher.module.state_dict(), student.module.state_dict()
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)
    assert load_distilled(out).sample_shape == (1, 8, 8)


def test_killed_run_resumes_to_the_same_weights(toy, tmp_path):
    table = uniform(toy, 2)
    cfg = DistillConfig(method="boss", steps=30, checkpoint_every=10, **FAST)
    full = distill(toy, table, cfg, tmp_path / "a").module.state_dict()
    out = tmp_path / "b"
    assert distill(toy, table, cfg, out, stop_after=25) is None
    work = out.with_name("b.work")
    ckpts = sorted(p.name for p in work.glob("ckpt-*"))
    assert ckpts == ["ckpt-00000020", "ckpt-00000025"]
    import shutil

    shutil.rmtree(work / "ckpt-00000025")  # killed after the step-20 checkpoint: steps 21-25 are lost
    with pytest.raises(StepsmithError, match="--resume"):
        distill(toy, table, cfg, out)
    with pytest.raises(StepsmithError, match="lr"):
        distill(toy, table, dataclasses.replace(cfg, lr=5e-4), out, resume=True)
    res = distill(toy, table, cfg, out, resume=True)
    for k, v in full.items():
        torch.testing.assert_close(res.module.state_dict()[k], v, rtol=0, atol=1e-6)
    assert [h["step"] for h in res.history] == [0, 10, 20, 30]


def test_corrupted_checkpoint_is_refused(toy, tmp_path):
    table = uniform(toy, 2)
    cfg = DistillConfig(method="reflow", steps=20, checkpoint_every=10, **FAST)
    out = tmp_path / "c"
    distill(toy, table, cfg, out, stop_after=10)
    ckpt = next(out.with_name("c.work").glob("ckpt-*"))
    for f in ckpt.glob("*.safetensors"):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(StepsmithError, match="corrupt"):
        distill(toy, table, cfg, out, resume=True)


def test_cli_refuses_table_of_another_convention(tmp_path, capsys):
    vp = VPConvention.default()
    bad = TimestepTable.from_sigmas([vp.sigma_max, 1.0, 0.0], convention=vp, prediction="epsilon", solver="euler",
                                    method="uniform", model="x")
    bad.save(tmp_path / "vp.json")
    rc = cli_main(["distill", "--model", "builtin:toy2d-flow", "--table", str(tmp_path / "vp.json"), "--steps", "5",
                   "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "vp" in err and "flow" in err
    assert not (tmp_path / "o").exists()


def test_ema_follows_the_warmup_rule():
    """diffusers' EMAModel as configured gives the hand-written EMA it replaced: decay at step k is
    min(cap, 1 - (1 + (k - 1))^-2/3), 0 at the first step."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(50)), nn.Parameter(torch.randn(3, 4))]
    cap, power = 0.6, 2 / 3
    ema = make_ema(params, cap)
    ref = [p.detach().double().clone() for p in params]
    for k in range(1, 11):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.step(params)
        decay = 0.0 if k - 1 <= 0 else min(cap, 1 - (1 + (k - 1)) ** -power)
        assert ema.cur_decay_value == decay
        ref = [r + (1 - decay) * (p.detach().double() - r) for r, p in zip(ref, params)]
        for s, r in zip(ema.shadow_params, ref):
            torch.testing.assert_close(s.double(), r, rtol=0, atol=1e-6)
    assert ema.cur_decay_value == cap  # the cap is reached within the ten steps


def test_cli_flags_come_from_distill_config(toy, tmp_path):
    parser = build_parser()
    base = ["distill", "--model", "builtin:toy2d-flow", "--table", "t.json", "--out", "o"]
    assert config_from_args(parser.parse_args([*base, "--steps", "7"])) == DistillConfig(steps=7)
    args = parser.parse_args([*base, "--steps", "7", "--lr", "1e-3", "--lora-alpha", "2", "--method", "kstep",
                              "--no-progress", "--keep-checkpoints", "3", "--teacher-solver", "euler"])
    assert config_from_args(args) == DistillConfig(steps=7, lr=1e-3, lora_alpha=2.0, method="kstep", progress=False,
                                                   keep_checkpoints=3, teacher_solver="euler")
    with pytest.raises(SystemExit):
        parser.parse_args(base)  # --steps is required on the command line
    with pytest.raises(StepsmithError) as exc:
        DistillConfig(lr=-1.0).validate()
    assert exc.value.param == "lr"
    # the output records the invocation as the command line gave it
    uniform(toy, 1).save(tmp_path / "t.json")
    argv = ["distill", "--model", "builtin:toy2d-flow", "--table", str(tmp_path / "t.json"), "--steps", "2",
            "--pairs", "20", "--teacher-steps", "4", "--batch-size", "8", "--no-progress", "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 0
    info = json.loads((tmp_path / "o" / "distill.json").read_text())
    assert info["command"] == shlex.join(["stepsmith", *argv])


@pytest.mark.slow
def test_two_processes_match_one_process(toy, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) = 1 process at the same global batch."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")):
        pytest.skip("accelerate CLI not installed")
    table = uniform(toy, 3)
    table.save(tmp_path / "t.json")
    args = ["--model", "builtin:toy2d-flow", "--table", str(tmp_path / "t.json"), "--steps", "12", "--pairs", "80",
            "--teacher-steps", "8", "--batch-size", "64", "--lr", "1e-3", "--warmup", "5", "--checkpoint-every", "6",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "distill", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli_main(["distill", *args, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "distill.json").read_text())
    assert two["processes"] == 2
    a, b = load_safetensors(tmp_path / "one" / "model.safetensors"), load_safetensors(tmp_path / "two" / "model.safetensors")
    teacher = toy.module.state_dict()
    assert any(not torch.allclose(a[k], teacher[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_weights(toy, tmp_path):
    """A real ``kill -9`` of ``stepsmith distill`` after a checkpoint; ``--resume`` finishes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    table = uniform(toy, 2)
    table.save(tmp_path / "t.json")
    args = ["--model", "builtin:toy2d-flow", "--table", str(tmp_path / "t.json"), "--steps", "300", "--pairs", "40",
            "--teacher-steps", "8", "--batch-size", "8", "--lr", "1e-3", "--warmup", "5", "--checkpoint-every", "25",
            "--no-progress"]
    out = tmp_path / "killed"
    work = tmp_path / "killed.work"
    proc = subprocess.Popen([sys.executable, "-m", "distill", *args, "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(work.glob("ckpt-*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the run finished before it could be killed")
    assert list(work.glob("ckpt-*")), proc.stderr.read().decode()[-2000:]
    assert cli_main(["distill", *args, "--out", str(out), "--resume"]) == 0
    assert cli_main(["distill", *args, "--out", str(tmp_path / "straight")]) == 0
    a, b = load_safetensors(out / "model.safetensors"), load_safetensors(tmp_path / "straight" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
