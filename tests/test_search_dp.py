"""Dynamic-programming search: exactness against brute force, cost matrices against the solvers, end to end."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from schedules.io import StepsmithError
from schedules.search import METHODS, make_table
from schedules.search.common import RollState, make_grid, one_step, reference_pass, rollout
from schedules.search.dp import (
    _costs_dpmpp,
    _costs_first_order,
    _costs_heun,
    bellman_all,
    bellman_all_augmented,
    final_error,
    refine_final_error,
    teacher_dp,
)
from schedules.search.toys import gaussian_adapter
from schedules.solvers import dpmpp_2m_step, sample


def brute(C, n, K, w=1.0):
    best, arg = math.inf, None
    for mid in itertools.combinations(range(1, n), K - 1):
        p = (0, *mid, n)
        c = sum(float(C[p[m], p[m + 1]]) * w ** (-(K - m - 1)) for m in range(K))
        if c < best:
            best, arg = c, list(p)
    return best, arg


def brute_aug(C2, C3, n, K):
    best = math.inf
    for mid in itertools.combinations(range(1, n), K - 1):
        p = (0, *mid, n)
        c = C2[p[0], p[1]] + sum(C3[p[m - 1], p[m], p[m + 1]] for m in range(1, K))
        best = min(best, float(c))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("w", [1.0, 1.2])
def test_bellman_equals_brute_force_all_budgets(seed, w):
    g = torch.Generator().manual_seed(seed)
    n = 8
    C = torch.rand(n + 1, n + 1, generator=g, dtype=torch.float64)
    res = bellman_all(C, n, late_weight=w)
    for K in range(1, n + 1):
        b, _ = brute(C, n, K, w)
        assert res.costs[K] == pytest.approx(b, rel=1e-12)
        p = res.paths[K]
        assert p[0] == 0 and p[-1] == n and len(p) == K + 1 and all(a < b for a, b in zip(p, p[1:]))
        recomputed = sum(float(C[p[m], p[m + 1]]) * w ** (-(K - m - 1)) for m in range(K))
        assert recomputed == pytest.approx(res.costs[K], rel=1e-12)


def test_all_budget_answers_consistent():
    g = torch.Generator().manual_seed(7)
    C = torch.rand(13, 13, generator=g, dtype=torch.float64)
    full = bellman_all(C, 12)
    for K in (1, 3, 5, 12):
        one = bellman_all(C, K)
        assert one.costs[K] == pytest.approx(full.costs[K]) and one.paths[K] == full.paths[K]


@pytest.mark.parametrize("seed", range(4))
def test_augmented_bellman_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = 7
    C2 = torch.rand(n + 1, n + 1, generator=g, dtype=torch.float64)
    C3 = torch.rand(n + 1, n + 1, n + 1, generator=g, dtype=torch.float64)
    res = bellman_all_augmented(C2, C3, n)
    for K in range(1, n + 1):
        assert res.costs[K] == pytest.approx(brute_aug(C2, C3, n, K), rel=1e-12)
        p = res.paths[K]
        c = float(C2[p[0], p[1]]) + sum(float(C3[p[m - 1], p[m], p[m + 1]]) for m in range(1, K))
        assert c == pytest.approx(res.costs[K], rel=1e-12)


@pytest.fixture(scope="module")
def curved():
    ad = gaussian_adapter("flow", 0.3, mean=0.7, dim=3)
    grid = make_grid(ad.convention, 12)
    ref = reference_pass(ad, ad.noise(5, 1), grid)
    return ad, grid, ref


def test_first_order_and_heun_costs_match_solver_steps(curved):
    ad, grid, ref = curved
    C1 = _costs_first_order(ad.convention, grid, ref)
    Ch = _costs_heun(ad, grid, ref)
    b = ref.x.shape[1]
    for i, j in [(0, 1), (0, 12), (3, 7), (5, 12), (11, 12)]:
        st = RollState(ref.x[i], ref.d[i], None, None)
        for solver, C in (("euler", C1), ("heun", Ch)):
            x = one_step(ad, solver, st, grid[i], grid[j])
            want = float(((x.double() - ref.x[j].double()) ** 2).sum()) / (ref.x[0].numel() / b)
            assert float(C[i, j]) == pytest.approx(want, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("conv", ["flow", "vp"])
def test_dpmpp_costs_match_solver_step(conv):
    ad = gaussian_adapter(conv, 0.4, mean=0.3, dim=3)
    grid = make_grid(ad.convention, 10)
    ref = reference_pass(ad, ad.noise(4, 2), grid)
    C2, C3 = _costs_dpmpp(ad.convention, grid, ref)
    numel_per = ref.x[0].numel() / ref.x.shape[1]
    for p, i, j in [(0, 1, 2), (0, 3, 10), (1, 2, 9), (2, 5, 6), (4, 7, 10)]:
        x = dpmpp_2m_step(ad.convention, ref.x[i].double(), ref.d[i].double(), grid[i], grid[j],
                          ref.d[p].double(), grid[p])
        want = float(((x - ref.x[j].double()) ** 2).sum()) / numel_per
        assert float(C3[p, i, j]) == pytest.approx(want, rel=1e-6, abs=1e-10)


def test_cost_matrix_independent_of_micro_batch():
    ad = gaussian_adapter("vp", 0.5, dim=4)
    grid = make_grid(ad.convention, 15)
    noise = ad.noise(12, 0)
    a = teacher_dp(ad, noise, grid, "dpmpp-2m", 6, micro_batch=12)
    b = teacher_dp(ad, noise, grid, "dpmpp-2m", 6, micro_batch=5)
    assert torch.allclose(a.extra["cost"], b.extra["cost"], rtol=1e-9, atol=1e-12)
    assert a.result.paths == b.result.paths


@pytest.mark.parametrize("solver", ["euler", "dpmpp-2m", "heun"])
def test_straight_flow_costs_zero(solver):
    ad = gaussian_adapter("flow", 0.0, mean=0.0, dim=3)  # point mass: every trajectory is a straight line
    for mode in ("teacher", "refined"):
        t = make_table(ad, "dp", 5, solver, samples=6, grid=20, mode=mode)
        assert abs(t.objective) < 1e-10


def test_refinement_never_worse_and_exact_final_error(vp_gaussian_problem):
    ad, grid, noise, target = vp_gaussian_problem(30)
    start = [0, 10, 20, 25, 30]
    e0 = float(((rollout(ad, "euler", [grid[i] for i in start], x=noise) - target) ** 2).mean())
    path, e, _ = refine_final_error(ad, "euler", grid, start, noise, target)
    x = sample(ad, noise, [grid[i] for i in path], "euler")
    assert e <= e0
    assert e == pytest.approx(float(((x - target) ** 2).mean()), rel=1e-6)
    assert path[0] == 0 and path[-1] == 30 and len(path) == 5


def test_refined_dp_beats_or_matches_teacher_dp_on_final_error():
    ad = gaussian_adapter("vp", 0.5, dim=4)
    noise = ad.noise(256, 10_000)  # held-out seed
    target = ad.module.den.exact_solution(noise, ad.convention.sigma_max)
    errs = {}
    for mode in ("teacher", "refined"):
        t = make_table(ad, "dp", 4, "ddim", samples=32, grid=40, mode=mode)
        errs[mode] = float(((sample(ad, noise, t.sigmas, "ddim") - target) ** 2).mean())
    dflt = make_table(ad, "default", 4, "ddim")
    e_default = float(((sample(ad, noise, dflt.sigmas, "ddim") - target) ** 2).mean())
    assert errs["refined"] <= errs["teacher"] * 1.001
    assert errs["refined"] < e_default


def test_determinism_and_provenance():
    ad = gaussian_adapter("flow", 0.3, mean=0.5, dim=3)
    a = make_table(ad, "dp", 4, "euler", samples=8, grid=20, seed=5)
    b = make_table(ad, "dp", 4, "euler", samples=8, grid=20, seed=5)
    assert a.sigmas == b.sigmas and a.objective == b.objective
    p = a.provenance
    for key in ("seed", "samples", "grid", "model_calls", "seconds", "solver", "package_version"):
        assert key in p
    assert p["seed"] == 5 and p["samples"] == 8 and p["model_calls"] > 0


def test_vp_dp_tables_use_integer_timesteps():
    ad = gaussian_adapter("vp", 0.5, dim=2)
    for solver in ("ddim", "dpmpp-2m"):
        t = make_table(ad, "dp", 4, solver, samples=4, grid=25)
        assert all(float(v).is_integer() for v in t.timesteps)


class _NaNModule(torch.nn.Module):
    def forward(self, x, _t):
        return x * float("nan")


def test_nan_model_and_bad_budgets():
    from schedules.adapters import ModelAdapter
    from schedules.conventions import FlowConvention

    bad = ModelAdapter(module=_NaNModule(), convention=FlowConvention(1.0), prediction="flow", sample_shape=(2,),
                       name="nan")
    with pytest.raises(StepsmithError, match="NaN"):
        make_table(bad, "dp", 3, samples=2, grid=10)
    ad = gaussian_adapter("flow", 0.3)
    with pytest.raises(StepsmithError, match="grid"):
        make_table(ad, "dp", 11, samples=2, grid=10)
    with pytest.raises(StepsmithError):
        make_table(ad, "dp", 0, samples=2)
    with pytest.raises(StepsmithError, match="unknown method"):
        make_table(ad, "magic", 3)
    with pytest.raises(StepsmithError, match="unknown solver"):
        make_table(ad, "dp", 3, "rk45")
    assert "dp" in METHODS and "uniform" in METHODS and "evolution" in METHODS and "ays" in METHODS


def test_cli_search_writes_table_and_rejects_bad_input(tmp_path, capsys):
    from schedules.cli import main
    from schedules.table import load_table

    out = tmp_path / "t.json"
    rc = main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--samples", "8", "--grid", "20",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    t = load_table(out)
    assert t.method == "dp" and t.steps == 3 and t.provenance["samples"] == 8
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    for bad in (["--nfe", "0"], ["--nfe", "21", "--grid", "20"], ["--nfe", "3", "--method", "nope"],
                ["--nfe", "3", "--solver", "rk4"], ["--nfe", "3", "--method", "shift", "--grid", "5"]):
        dst = tmp_path / "bad.json"
        rc = main(["search", "--model", "builtin:toy2d-flow", "--no-progress", "--samples", "4", "--out", str(dst), *bad])
        assert rc == 2 and not dst.exists()
        assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("solver", ["euler", "dpmpp-2m"])
def test_pattern_refinement_exact_error_local_optimum_and_cheaper(solver, vp_gaussian_problem):
    ad, grid, noise, target = vp_gaussian_problem(40)
    start = [3, 12, 20, 33, 40]

    def err(p):
        return float(((sample(ad, noise, [grid[i] for i in p], solver) - target) ** 2).mean())

    counted = {}
    for moves in ("pattern", "coarse-fine", "candidates"):
        calls0 = ad.calls  # the adapter counts its batched model calls
        path, e, sweeps = refine_final_error(ad, solver, grid, start, noise, target, moves=moves, candidates=12,
                                             max_sweeps=20, free_start=True)
        counted[moves] = (ad.calls - calls0, e)
        assert e <= err(start)
        assert e == pytest.approx(err(path), rel=1e-6)  # the spliced cached states give the true final error
        assert path[-1] == 40 and len(path) == 5 and all(a < b for a, b in zip(path, path[1:]))
        if moves != "candidates":
            assert sweeps < 20  # converged: no ±1 move of any node helps
            for m in range(4):
                for c_ in (path[m] - 1, path[m] + 1):
                    lo = path[m - 1] + 1 if m > 0 else 0
                    if lo <= c_ < path[m + 1]:
                        assert err(path[:m] + [c_] + path[m + 1:]) >= e * (1 - 1e-9)
    assert counted["pattern"][0] < counted["candidates"][0]
    # coarse-fine's first sweep is one candidates sweep; its ±1 sweeps after it can only improve
    _, e1, _ = refine_final_error(ad, solver, grid, start, noise, target, moves="candidates", candidates=12, max_sweeps=1,
                                  free_start=True)
    assert counted["coarse-fine"][1] <= e1


def test_refined_dp_seeds_from_every_spacing_and_is_never_worse_than_them():
    from schedules.search.dp_method import START_SPACINGS, refinement_starts

    ad = gaussian_adapter("vp", 0.5, dim=4)
    g = make_grid(ad.convention, 30)
    starts = refinement_starts(ad, 4, "ddim", g, {"dp-teacher": [0, 5, 10, 20, 30]}, True)
    assert set(starts) - {"dp-teacher"} <= set(START_SPACINGS)
    assert len({tuple(p) for p in starts.values()}) == len(starts)  # duplicates are left out
    t = make_table(ad, "dp", 4, "ddim", samples=8, grid=30)
    p = t.provenance
    assert "dp-student" in p["start_final_errors"] and p["moves"] == "pattern" and p["student_start"] is True
    assert t.objective <= min(p["start_final_errors"].values())
    s = make_table(ad, "dp", 4, "ddim", samples=8, grid=30, student_start=False, moves="candidates")
    assert "dp-student" not in s.provenance["start_final_errors"] and s.provenance["moves"] == "candidates"
    assert s.objective <= min(s.provenance["start_final_errors"].values())
    assert make_table(ad, "dp", 8, "ddim", samples=4, grid=30).provenance["moves"] == "candidates"  # auto, K >= 8
    with pytest.raises(StepsmithError, match="moves") as e:
        make_table(ad, "dp", 4, "ddim", samples=8, grid=30, moves="random")
    assert e.value.param == "moves"


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_refinement_call_budget_stops_early_and_keeps_best(solver, vp_gaussian_problem):
    ad, grid, noise, target = vp_gaussian_problem(30)
    start = [0, 10, 20, 25, 30]
    e0 = final_error(ad, solver, [grid[i] for i in start], noise, target)
    full_calls0 = ad.calls
    _, e_full, _ = refine_final_error(ad, solver, grid, start, noise, target, candidates=8, max_sweeps=3)
    full = ad.calls - full_calls0
    ceiling = ad.calls + full // 3
    stats = {}
    path, e, _ = refine_final_error(ad, solver, grid, start, noise, target, candidates=8, max_sweeps=3,
                                    max_calls=ceiling, stats=stats)
    assert stats.get("out_of_calls") is True
    assert ad.calls <= ceiling
    assert e_full <= e <= e0
    assert e == pytest.approx(final_error(ad, solver, [grid[i] for i in path], noise, target), rel=1e-6)


def test_dp_max_cost_bounds_the_search_and_is_recorded():
    ad = gaussian_adapter("vp", 0.5, dim=4)
    c0 = ad.calls
    free = make_table(ad, "dp", 6, "euler", samples=8, grid=30)
    ref_per_sample = free.provenance["reference_calls"]  # 8 samples fit one micro-batch
    cost = (ad.calls - c0) / ref_per_sample
    # halfway between one reference pass and what the unbounded search cost: the refinement must stop early
    budget = 0.5 * (cost + 1)
    c0 = ad.calls
    t = make_table(ad, "dp", 6, "euler", samples=8, grid=30, max_cost=budget)
    assert ad.calls - c0 <= budget * ref_per_sample
    assert t.provenance["max_cost"] == budget and t.provenance["out_of_calls"] is True
    assert free.provenance["out_of_calls"] is False
    assert free.objective <= t.objective <= t.provenance["start_final_errors"][t.provenance["start"]]
    for bad in (0.5, True, "x"):
        with pytest.raises(StepsmithError, match="max_cost"):
            make_table(ad, "dp", 6, "euler", samples=8, grid=30, max_cost=bad)
    with pytest.raises(StepsmithError, match="max_cost"):
        make_table(ad, "dp", 6, "euler", samples=8, grid=30, max_cost=2.0, variant="boss")


def test_dp_refines_a_second_start_at_another_start_level_below_8_steps(monkeypatch):
    import schedules.search.dp_method as dp_method

    ad = gaussian_adapter("vp", 0.5, dim=4)
    # every other start here is 3.8x worse than the best, past SECOND_START_WITHIN: one refinement
    t = make_table(ad, "dp", 4, "ddim", samples=8, grid=30)
    errs = t.provenance["start_final_errors"]
    assert list(t.provenance["refined_starts"]) == [min(errs, key=errs.get)]
    monkeypatch.setattr(dp_method, "SECOND_START_WITHIN", 100.0)
    t = make_table(ad, "dp", 4, "ddim", samples=8, grid=30)
    p = t.provenance
    refined, first = p["refined_starts"], p["start_first_nodes"]
    assert len(refined) == 2 and min(errs, key=errs.get) in refined  # the best start, and one more
    a, b = refined
    assert first[a] != first[b]  # ...at another start level
    assert errs[b] == min(v for k, v in errs.items() if first[k] != first[a])
    assert t.objective == min(refined.values()) and p["start"] == min(refined, key=refined.get)
    assert len(make_table(ad, "dp", 4, "ddim", samples=8, grid=30, second_start=False)
               .provenance["refined_starts"]) == 1
    # with the first node fixed every start has the same start level: nothing to add
    assert len(make_table(ad, "dp", 4, "ddim", samples=8, grid=30, free_start=False).provenance["refined_starts"]) == 1
    # from 8 steps on (candidate moves, a refinement costs several times more) only when asked
    assert len(make_table(ad, "dp", 8, "ddim", samples=4, grid=30).provenance["refined_starts"]) == 1
    assert len(make_table(ad, "dp", 8, "ddim", samples=4, grid=30, second_start=True).provenance["refined_starts"]) == 2
    for bad in ("yes", 2, 1):
        with pytest.raises(StepsmithError, match="second_start"):
            make_table(ad, "dp", 4, "ddim", samples=8, grid=30, second_start=bad)
