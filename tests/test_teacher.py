"""One teacher, one integration loop, conventions that own time."""

from __future__ import annotations

import math

import pytest
import torch

from schedules.conventions import EDMConvention, FlowConvention, VPConvention
from schedules.io import StepsmithError
from schedules.search.common import final_mse_kind, make_grid, reference_pass, rollout, search_teacher
from schedules.search.toys import gaussian_adapter
from schedules.solvers import SOLVERS, NodeState, evaluate, integrate, reference_sample, sample
from schedules.teacher import DEFAULT_TEACHER, Teacher, teacher_sample


@pytest.fixture(params=["flow", "vp"])
def ad(request):
    return gaussian_adapter(request.param, 0.4, mean=0.2, dim=3)


def test_reference_sample_is_the_default_teacher(ad):
    noise = ad.noise(6, 0)
    a = reference_sample(ad, noise, 30)
    b = teacher_sample(ad, noise, Teacher("heun", 30), batch_size=4).x
    assert torch.equal(a, b)
    assert DEFAULT_TEACHER.name == "heun-200@reference" and DEFAULT_TEACHER.nfe == 399


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_rollout_resumed_mid_table_equals_one_pass(ad, solver):
    """The search rollouts, sampling and the teacher are the same loop: resuming from a recorded state is exact."""
    sig = make_grid(ad.convention, 9)
    noise = ad.noise(5, 1)
    full, states = rollout(ad, solver, sig, x=noise, keep=True)
    assert torch.equal(full, sample(ad, noise, sig, solver))
    assert torch.equal(rollout(ad, solver, sig[3:], start=states[3]), full)
    assert torch.equal(integrate(ad, states[3], sig[3:], solver), full)


def test_teacher_nodes_are_its_own_states(ad):
    grid = make_grid(ad.convention, 8)
    noise = ad.noise(7, 2)
    sub = 2 if ad.convention.name == "flow" else 1  # VP substeps would fall below σ_min on the last interval
    run = teacher_sample(ad, noise, search_teacher(grid, sub), batch_size=3, nodes=grid)
    assert run.states.shape == (len(grid), 7, 3) and torch.equal(run.states[0], noise)
    assert torch.equal(run.states[-1], run.x)
    # the state at node 4 continued with the same teacher reaches the same final sample
    rest = Teacher.on_grid(run.teacher.grid(ad.convention)[4 * sub:], "heun")
    assert rest.grid(ad.convention)[0] == grid[4]
    assert torch.allclose(teacher_sample(ad, run.states[4], rest).x, run.x, atol=1e-12, rtol=0)
    ref = reference_pass(ad, noise[:3], grid, sub)
    assert torch.equal(ref.x, run.states[:, :3]) and torch.equal(ref.d, run.denoised[:-1, :3])
    with pytest.raises(StepsmithError, match="not on the teacher's grid"):
        teacher_sample(ad, noise, search_teacher(grid), nodes=[0.123456])


def test_searched_tables_name_their_teacher():
    ad = gaussian_adapter("flow", 0.3, mean=0.5, dim=3)
    from schedules.search import make_table

    t = make_table(ad, "evolution", 3, "euler", samples=4, grid=12, population=4, generations=1, elite=2)
    assert t.provenance["teacher"]["name"] == "heun-12@search-grid"
    assert t.provenance["objective_kind"] == final_mse_kind(search_teacher(make_grid(ad.convention, 12)))
    t = make_table(ad, "ays", 3, "euler", samples=4, draws=1, candidates=3, max_sweeps=1, teacher_steps=10)
    assert t.provenance["objective_kind"] == "final mse vs heun-10@reference (search samples)"


def test_one_loop_state_carries_the_multistep_history(ad):
    sig = make_grid(ad.convention, 6)
    x = ad.noise(4, 3)
    seen: list[NodeState] = []
    integrate(ad, x, sig, "dpmpp-2m", on_node=lambda _i, _s, st: seen.append(st))
    assert [st.s_prev for st in seen] == [None, *sig[:5]]
    assert seen[0].x0_prev is None and torch.equal(seen[2].x0_prev, seen[1].x0)
    again = evaluate(ad, seen[2].x, sig[2], seen[1].x0, sig[1])
    assert torch.equal(again.x0, seen[2].x0)


@pytest.mark.parametrize("conv", [FlowConvention(1000.0), VPConvention.default(), EDMConvention()],
                         ids=["flow", "vp", "edm"])
def test_conventions_own_time(conv):
    lo, hi = conv.sampling_range()
    assert 0 < lo < hi
    assert conv.from_edm(conv.to_edm(0.3)) == pytest.approx(0.3, rel=1e-12)
    ref = conv.reference_sigmas(10)
    assert len(ref) == 11 and ref[-1] == 0.0 and all(a > b for a, b in zip(ref, ref[1:]))
    grid = conv.search_grid(12)
    assert len(grid) == 13 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))
    snapped = conv.snap_nodes([hi * 2, lo / 2])
    assert snapped[-1] == 0.0 and lo / 2 <= snapped[1] and snapped[0] <= hi * (1 + 1e-9)
    lo_e, hi_e = conv.edm_range()
    assert math.isfinite(hi_e) and 0 < lo_e < hi_e
    x0, eps = torch.zeros(2, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
    s = torch.tensor([[0.5], [0.5]], dtype=torch.float64)
    assert torch.allclose(conv.add_noise(x0, eps, s), conv.sigma_t(s))  # x = α·x0 + σ_t·ε


def test_flow_time_specifics():
    conv = FlowConvention()
    assert conv.to_edm(1.0) == math.inf and conv.from_edm(math.inf) == 1.0
    t = torch.tensor([math.inf, 1.0], dtype=torch.float64)
    assert conv.from_edm(t).tolist() == [1.0, 0.5] and conv.to_edm(torch.tensor([1.0, 0.5])).tolist() == [math.inf, 1.0]
    assert conv.sampling_range() == (1e-3, 1.0) and conv.sampling_range(500) == (1 / 500, 1.0)
    assert conv.pin_noise_start([0.9, 0.5]) == [1.0, 0.5] and conv.discrete_timesteps is None
    assert VPConvention.default().discrete_timesteps == 1000 and EDMConvention().discrete_timesteps is None
