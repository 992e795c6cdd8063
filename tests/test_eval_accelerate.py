"""Scale-out: `accelerate launch` with 2 CPU processes gives the same FID as 1 process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eval.sweep import run_sweep
from schedules.adapters import load_model
from schedules.io import save_safetensors

MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class GaussFlow(nn.Module):
        """Exact FlowMatch velocity for per-pixel Gaussian data N(-0.3, 0.5^2)."""

        sample_shape = (1, 16, 16)

        def forward(self, x, t):
            sd, mu = 0.5, -0.3
            s = t.view(-1, 1, 1, 1).to(x.dtype)
            a = 1 - s
            x0 = mu + a * sd**2 * (x - a * mu) / (a**2 * sd**2 + s**2)
            return (x - x0) / s
''')


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    (tmp_path / "gauss.py").write_text(MODEL)
    real = torch.randn(300, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 0.5 - 0.3
    save_safetensors(tmp_path / "real.safetensors", {"images": real})
    spec = f"{tmp_path / 'gauss.py'}:GaussFlow"
    args = ["--model", spec, "--prediction", "flow", "--methods", "uniform", "--nfe", "1,3", "--num", "201",
            "--real", str(tmp_path / "real.safetensors"), "--teacher-steps", "4", "--grid", "8",
            "--cache-dir", str(tmp_path / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "schedules.cli", "eval", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2

    model = load_model(spec, prediction="flow")
    one = run_sweep(model, methods=["uniform"], nfe=[1, 3], num=201, real=real, teacher_steps=4, grid=0,
                    cache=tmp_path / "cache", progress=False)
    assert one["processes"] == 1
    for a, b in zip(one["results"], two["results"]):
        assert (a["nfe"], a["n"]) == (b["nfe"], b["n"]) == (b["nfe"], 201)
        assert b["value"] == pytest.approx(a["value"], rel=1e-6)
        assert b["extra"]["teacher_mse"] == pytest.approx(a["extra"]["teacher_mse"], rel=1e-6)
        assert b["model_calls"] == 2 * a["model_calls"]  # each process evaluated its own slice
    assert two["teacher"]["value"] == pytest.approx(one["teacher"]["value"], rel=1e-6)
    assert one["results"][0]["value"] > one["results"][1]["value"] > one["teacher"]["value"]
