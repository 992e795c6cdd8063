"""Corridor student DP (only nodes near the seed paths) and the refinement's exact savings."""

from __future__ import annotations

import pytest
import torch

from schedules.io import StepsmithError
from schedules.search import make_table
from schedules.search.common import make_grid, reference_pass, rollout
from schedules.search.dp import corridor_bands, refine_final_error, student_dp, student_dp_corridor
from schedules.search.toys import gaussian_adapter

torch.set_num_threads(1)


class _Recording:
    """Wraps an adapter; records the σ of each batched model call (``calls``: how many)."""

    def __init__(self, ad):
        self.ad, self.sigmas = ad, []

    def __getattr__(self, name):
        return getattr(self.ad, name)

    @property
    def calls(self) -> int:
        return len(self.sigmas)

    def denoise(self, x, s):
        self.sigmas.append(float(s.flatten()[0]))
        return self.ad.denoise(x, s)


@pytest.fixture(scope="module")
def setup():
    ad = gaussian_adapter("vp", 0.5, mean=0.4, dim=4)
    grid = make_grid(ad.convention, 24)
    noise = ad.noise(6, 2)
    ref = reference_pass(ad, noise, grid)
    return ad, grid, noise, ref.x


def test_bands_clip_to_feasible_nodes_and_hold_the_terminal():
    b = corridor_bands(20, [[0, 3, 9, 20], [0, 10, 20]], 2)
    assert b[1] == {1, 2, 3, 4, 5} | {8, 9, 10, 11, 12}  # both seeds' first nodes, each ± 2
    assert b[2] == {7, 8, 9, 10, 11} | {20}  # the 2-step seed ends at level 2
    assert b[3] == {20}
    # a band never holds a node from which its budget cannot finish, nor one below its level
    assert corridor_bands(10, [[0, 1, 8, 9, 10]], 3)[3] == {6, 7, 8, 9}
    assert corridor_bands(10, [[0, 1, 8, 9, 10]], 3)[1] == {1, 2, 3, 4}
    with pytest.raises(StepsmithError) as e:
        corridor_bands(10, [[0, 5, 4, 10]], 1)
    assert e.value.param == "student_corridor"
    with pytest.raises(StepsmithError):
        corridor_bands(10, [[0, 5, 10]], -1)


@pytest.mark.parametrize("solver", ["euler", "dpmpp-2m"])
def test_corridor_covering_the_grid_equals_the_full_student_dp(setup, solver):
    ad, grid, noise, T = setup
    n = len(grid) - 1
    full = student_dp(ad, noise, grid, solver, 5, T)
    seeds = [[0, 5, 10, 15, 20, n], [0, 12, n]]
    wide = student_dp(ad, noise, grid, solver, 5, T, bands=corridor_bands(n, seeds, n))
    for K in (2, 5):
        assert wide.paths[K] == full.paths[K]
        assert wide.costs[K] == pytest.approx(full.costs[K], rel=1e-12)
    assert set(wide.paths) == {2, 5}  # only the seeds' budgets get a path


def test_corridor_evaluates_the_model_only_inside_its_band(setup):
    ad, grid, noise, T = setup
    n = len(grid) - 1
    seed = [0, 4, 9, 15, n]
    bands = corridor_bands(n, [seed], 1)
    rec = _Recording(ad)
    res = student_dp(rec, noise, grid, "euler", 4, T, bands=bands)
    allowed = {0} | set().union(*(b - {n} for b in bands.values()))
    idx = [min(range(n + 1), key=lambda j, s=s: abs(grid[j] - s)) for s in rec.sigmas]
    assert set(idx) <= allowed and idx[0] == 0
    assert rec.calls == 1 + sum(len(bands[k]) for k in (1, 2, 3)) == 1 + 3 * 3  # vs ≈ K·n for the full DP
    full = _Recording(ad)
    student_dp(full, noise, grid, "euler", 4, T)
    assert full.calls > 5 * rec.calls
    p = res.paths[4]
    assert all(abs(p[k] - seed[k]) <= 1 for k in range(5))
    # the corridor's path is the best in its band: no worse on its own cost than the seed itself
    zero = student_dp(ad, noise, grid, "euler", 4, T, bands=corridor_bands(n, [seed], 0))
    assert zero.paths[4] == seed and res.costs[4] <= zero.costs[4]
    assert zero.costs[4] == pytest.approx(float(((rollout(ad, "euler", [grid[i] for i in seed], x=noise).double()
                                                  - T[n].double()) ** 2).mean()), rel=1e-6)


def test_iterated_corridor_walks_to_a_path_inside_its_band(setup):
    ad, grid, noise, T = setup
    n = len(grid) - 1
    far = [0, 1, 2, 3, n]  # a poor seed, far from the student optimum
    rec = _Recording(ad)
    res = student_dp_corridor(rec, noise, grid, "euler", {4: far}, T, 2)
    one = student_dp(ad, noise, grid, "euler", 4, T, bands=corridor_bands(n, [far], 2))
    assert res.rounds > 1 and res.costs[4] < one.costs[4]  # re-centring moved on past the first corridor
    full = student_dp(ad, noise, grid, "euler", 4, T)
    assert res.costs[4] <= one.costs[4] and res.costs[4] >= full.costs[4] * (1 - 1e-12)
    assert rec.calls <= res.rounds * (1 + 3 * 5)  # every round: the start, then ≤ 2·2 + 1 nodes per level
    # it stops when the answer lies inside the corridor: re-running from it moves no node by 2 or more
    again = student_dp(ad, noise, grid, "euler", 4, T, bands=corridor_bands(n, [res.paths[4]], 2))
    assert res.rounds == 10 or all(abs(a - b) < 2 for a, b in zip(again.paths[4], res.paths[4]))
    # seeded at the full DP's answer with a corridor wide enough, it is the full DP's answer in one round
    exact = student_dp_corridor(ad, noise, grid, "euler", {4: full.paths[4]}, T, n)
    assert exact.paths[4] == full.paths[4] and exact.rounds == 1
    with pytest.raises(StepsmithError) as e:
        student_dp_corridor(ad, noise, grid, "euler", {4: far}, T, 0)
    assert e.value.param == "student_corridor"


@pytest.mark.parametrize("moves", ["candidates", "pattern"])
def test_refinement_skips_nodes_nothing_moved_around_and_keeps_its_answer(moves, vp_gaussian_problem):
    ad, grid, noise, target = vp_gaussian_problem(40)
    start = [3, 12, 20, 33, 40]
    K = len(start) - 1
    rec = _Recording(ad)
    path, e, sweeps = refine_final_error(rec, "euler", grid, start, noise, target, moves=moves, candidates=8,
                                         max_sweeps=20, free_start=True)
    assert sweeps >= 2
    # the same descent without any skipping: one fresh sweep at a time (a first sweep searches every node)
    naive, p, e1 = _Recording(ad), list(start), None
    for _ in range(sweeps):
        p, e1, _ = refine_final_error(naive, "euler", grid, p, noise, target, moves=moves, candidates=8,
                                      max_sweeps=1, free_start=True)
    if moves == "candidates":  # exact: the same path and error, for fewer calls
        assert p == path and e1 == pytest.approx(e, rel=1e-9)
        assert rec.calls < naive.calls - (sweeps - 1) * K
    # with the start's rollout handed over, the refinement spends exactly K calls fewer and finds the same
    x, states = rollout(ad, "euler", [grid[i] for i in start], x=noise, keep=True)
    e0 = float(((x - target) ** 2).mean())
    rec2 = _Recording(ad)
    path2, e2, sweeps2 = refine_final_error(rec2, "euler", grid, start, noise, target, moves=moves,
                                            candidates=8, max_sweeps=20, free_start=True, start=(e0, states))
    assert (path2, sweeps2) == (path, sweeps) and e2 == pytest.approx(e, rel=1e-9)
    assert rec2.calls == rec.calls - K


def test_dp_option_student_corridor():
    ad = gaussian_adapter("vp", 0.5, dim=4)
    full = make_table(ad, "dp", 4, "ddim", samples=8, grid=30, student_corridor=None)
    cheap = make_table(ad, "dp", 4, "ddim", samples=8, grid=30, student_corridor=2)
    assert cheap.provenance["student_corridor"] == 2 and full.provenance["student_corridor"] is None
    assert "dp-student" in cheap.provenance["start_final_errors"]
    assert cheap.provenance["model_calls"] < full.provenance["model_calls"]
    assert cheap.objective <= min(cheap.provenance["start_final_errors"].values())
    from schedules.search.dp_method import STUDENT_CORRIDOR

    dflt = make_table(ad, "dp", 4, "ddim", samples=8, grid=30)
    assert dflt.provenance["student_corridor"] == STUDENT_CORRIDOR == 2 and dflt.provenance["corridor_rounds"] >= 1
    wide = make_table(ad, "dp", 4, "ddim", samples=8, grid=30, student_corridor=30)
    assert wide.provenance["start_final_errors"]["dp-student"] == full.provenance["start_final_errors"]["dp-student"]
    for bad in (-1, 1.5, True):
        with pytest.raises(StepsmithError) as e:
            make_table(ad, "dp", 4, "ddim", samples=8, grid=30, student_corridor=bad)
        assert e.value.param == "student_corridor"
