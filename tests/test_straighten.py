"""Straightening that shows: teacher data always start at σ_max, and the BOSS student along a table is
never worse than the teacher along that table — for a free-start table as for one that starts at σ = 1."""

from __future__ import annotations

import pytest
import torch

from distill.boss import BOSSStraightening
from distill.data import generate_teacher_data
from distill.trainer import DistillConfig, distill
from eval.metrics import wasserstein
from schedules.adapters import load_model
from schedules.embedded.nets import toy2d_data
from schedules.solvers import sample
from schedules.table import TimestepTable
from schedules.teacher import Teacher, teacher_sample

torch.set_num_threads(1)

FREE_START = [0.48, 0.09, 0.0]  # toy2d's 2-step DP table: noise read as the state at σ = 0.48
SIGMA_ONE = [1.0, 0.5, 0.0]


@pytest.fixture(scope="module")
def toy():
    return load_model("builtin:toy2d-flow")


def _table(model, sigmas):
    return TimestepTable.from_sigmas(sigmas, convention=model.convention, prediction=model.prediction,
                                     solver="euler", method="manual", model=model.name)


def test_teacher_data_start_at_sigma_max_for_a_free_start_table(toy):
    table = _table(toy, FREE_START)
    data = generate_teacher_data(toy, [table], 40, seed=3, teacher_steps=20)
    assert data.nodes[0] == 1.0 and data.s_max == 1.0
    assert [data.nodes[data.node_index(v)] for v in FREE_START] == FREE_START
    assert torch.equal(data.noise, toy.noise(40, 3))
    # the recorded states are the teacher's trajectory from the noise at σ = 1, not from σ = 0.48
    grid = sorted(set(toy.convention.reference_sigmas(20)) | set(FREE_START), reverse=True)
    run = teacher_sample(toy, data.noise, Teacher.on_grid(grid), nodes=FREE_START)
    torch.testing.assert_close(data.states[:, 1:], run.states.transpose(0, 1))
    # BOSS's first segment is the jump the sampler makes: the noise read at σ = 0.48 → the teacher at 0.09
    boss = BOSSStraightening(data, [table], toy.convention)
    first = boss.validation().slice(slice(0, 1))
    assert float(first.s[0]) == 0.48
    n0 = data.n_train
    torch.testing.assert_close(first.x[0], data.noise[n0])
    torch.testing.assert_close(first.slope[0], (data.states[n0, data.node_index(0.09)] - data.noise[n0]) / (0.09 - 0.48))


@pytest.mark.parametrize("sigmas", [FREE_START, SIGMA_ONE], ids=["free-start", "sigma-1"])
def test_student_along_its_table_is_never_worse_than_the_teacher(toy, sigmas):
    table = _table(toy, sigmas)
    cfg = DistillConfig(method="boss", steps=200, batch_size=256, lr=1e-3, warmup=20, pairs=1000, teacher_steps=40,
                        progress=False, log_every=50, eval_every=200)
    student = distill(toy, table, cfg).adapter
    noise, real = toy.noise(1000, 10_000), toy2d_data(1000, seed=10_001)
    w_teacher = wasserstein(sample(toy, noise, table.sigmas), real)
    w_student = wasserstein(sample(student, noise, table.sigmas), real)
    assert w_student <= w_teacher, (w_student, w_teacher)
