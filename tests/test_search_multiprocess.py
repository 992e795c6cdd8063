"""Two CPU processes (torch.distributed gloo via torchrun) split the reference pass and sum-reduce the cost
matrix: the same table as one process, and a checkpoint one process resumes. (``accelerate launch --cpu``
starts a single process on this machine, so the test uses torch's own launcher; the CLI joins the group
through accelerate's PartialState.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from schedules.search import make_table


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["dpmpp-2m"])  # exercises both reduced cost tensors
def test_two_processes_give_the_same_table(tmp_path, solver):
    out, ck = tmp_path / "mp.json", tmp_path / "mp.pt"
    args = ["--model", "builtin:toy2d-flow", "--nfe", "4", "--solver", solver, "--samples", "12", "--grid", "24",
            "--seed", "3", "--no-progress", "--option", "micro_batch=4", "--option", f"checkpoint={ck}", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "schedules.cli", "search", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.loads(out.read_text())
    assert two["provenance"]["processes"] == 2
    from schedules import load_model

    one = make_table(load_model("builtin:toy2d-flow"), "dp", 4, solver, samples=12, seed=3, grid=24, micro_batch=4)
    assert one.provenance["processes"] == 1
    assert two["sigmas"] == one.sigmas
    assert two["objective"] == pytest.approx(one.objective, rel=1e-9)
    # the main rank wrote the checkpoint (the others never write it): one process reads the finished search back
    ad = load_model("builtin:toy2d-flow")
    again = make_table(ad, "dp", 4, solver, samples=12, seed=3, grid=24, micro_batch=4, checkpoint=str(ck))
    assert ad.calls == 0 and again.sigmas == two["sigmas"] and again.provenance["processes"] == 2
