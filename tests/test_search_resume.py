"""A dp or ays search killed anywhere resumes from its checkpoint and ends with exactly the uninterrupted tables."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.resume import Killed, killed_after
from schedules.adapters import load_model
from schedules.io import StepsmithError
from schedules.search import make_table, make_tables
from schedules.search.dp import refine_final_error
from schedules.search.resume import checkpoint_format
from tests.test_search_evolution import gaussian_adapter

TOY = "builtin:toy2d-flow"
OPTS = dict(samples=16, grid=30, candidates=4, max_sweeps=2)


def run_until_done(model: str, nfe: list[int], solver: str, ck, first_kill: int, step: int, method: str = "dp",
                   **opts):
    """Kill the search at ``first_kill`` calls, then every ``step`` calls after each restart, until it ends."""
    kills, limit = 0, first_kill
    while kills < 30:
        ad = killed_after(load_model(model), limit)
        try:
            return make_tables(ad, method, nfe, solver, checkpoint=str(ck), **opts), kills
        except Killed:
            kills += 1
            limit = ad.calls + step
    raise AssertionError("the search made no progress over 30 restarts")


def same(a: dict, b: dict) -> bool:
    return all(a[k].sigmas == b[k].sigmas and a[k].objective == b[k].objective
               and a[k].provenance["path"] == b[k].provenance["path"] for k in a)


@pytest.mark.parametrize("solver,nfe,opts", [
    ("euler", [2, 4], {}),
    ("euler", [2, 4], {"max_cost": 3.0}),  # binds inside NFE 4's refinement: it counts every run's calls
    ("dpmpp-2m", [4, 6], {}),
    ("heun", [3, 5], {"grid": 20}),
])
def test_killed_anywhere_resumes_to_the_same_tables(tmp_path, solver, nfe, opts):
    o = {**OPTS, **opts}
    ad = load_model(TOY)
    full = make_tables(ad, "dp", nfe, solver, **o)
    n, shared = ad.calls, full[nfe[0]].provenance["shared_pass"]["model_calls"]
    for frac in (0.3, 0.6, 0.9):  # in the shared pass, the starts or the refinement, between budgets
        ck = tmp_path / f"{solver}-{frac}.pt"
        # after a restart, the shared pass again (unless saved) and a sixth of the search before the next kill
        got, kills = run_until_done(TOY, nfe, solver, ck, int(n * frac), shared + n // 6, **o)
        assert kills >= 1 and same(got, full), (frac, {k: t.provenance["path"] for k, t in got.items()})


def test_a_resumed_search_does_not_redo_saved_work(tmp_path):
    """The resumed run spends only what was left (plus one rollout to rebuild the refined path's states), and the
    table's provenance counts the calls of both runs."""
    ad = load_model(TOY)
    full = make_table(ad, "dp", 4, **OPTS)
    n = full.provenance["model_calls"]
    ck = tmp_path / "dp.pt"
    first = killed_after(load_model(TOY), int(n * 0.7))
    with pytest.raises(Killed):
        make_table(first, "dp", 4, checkpoint=str(ck), **OPTS)
    saved = torch.load(ck, weights_only=True)
    assert saved["format"] == checkpoint_format("dp") and saved["state"]["shared"] is not None
    assert saved["state"]["finish"][4]["errs"]
    second = load_model(TOY)
    resumed = make_table(second, "dp", 4, checkpoint=str(ck), **OPTS)
    assert resumed.sigmas == full.sigmas and resumed.objective == full.objective
    assert second.calls <= n - saved["spent"]["model_calls"] + 4  # at most K calls spent twice
    prov = resumed.provenance
    assert prov["resumed"]["model_calls"] == saved["spent"]["model_calls"]
    assert prov["model_calls"] == saved["spent"]["model_calls"] + second.calls >= n
    # the finished search: a third run loads the table and spends nothing
    third = load_model(TOY)
    again = make_table(third, "dp", 4, checkpoint=str(ck), **OPTS)
    assert third.calls == 0 and again.sigmas == full.sigmas and again.provenance["model_calls"] == prov["model_calls"]


def test_another_search_is_refused_before_any_model_call(tmp_path):
    ck = tmp_path / "dp.pt"
    make_table(load_model(TOY), "dp", 3, checkpoint=str(ck), **OPTS)
    before = ck.read_bytes()
    for change in ({"nfe": 4}, {"seed": 1}, {"candidates": 5}, {"solver": "heun", "nfe": 3}):
        ad = load_model(TOY)
        kw = {**OPTS, **{k: v for k, v in change.items() if k not in ("nfe", "solver")}}
        with pytest.raises(StepsmithError, match="another search"):
            make_table(ad, "dp", change.get("nfe", 3), change.get("solver", "euler"), checkpoint=str(ck), **kw)
        assert ad.calls == 0
    assert ck.read_bytes() == before


def test_a_checkpoint_holds_only_for_its_guidance(tmp_path):
    """Guided conditional model: its errors were measured under one guidance scale."""
    from schedules.conditioning import Conditioning

    opts = dict(samples=4, grid=16, candidates=3, max_sweeps=1)
    at = {w: load_model("builtin:digits-cond", conditioning=Conditioning(labels="all", guidance=w)) for w in (2.0, 3.0)}
    ck = tmp_path / "cond.pt"
    first = make_table(at[2.0], "dp", 3, checkpoint=str(ck), **opts)
    calls = at[2.0].calls
    assert make_table(at[2.0], "dp", 3, checkpoint=str(ck), **opts).sigmas == first.sigmas
    assert at[2.0].calls == calls  # loaded, not searched again
    with pytest.raises(StepsmithError, match="another search"):
        make_table(at[3.0], "dp", 3, checkpoint=str(ck), **opts)


@pytest.mark.parametrize("moves", ["candidates", "pattern"])
def test_refinement_resumed_from_any_node_ends_the_same(moves):
    """refine_final_error's on_node state, passed back as resume (with the rebuilt node states), goes on exactly."""
    from schedules.search.common import make_grid, rollout

    ad = gaussian_adapter("vp", 0.5, dim=3)
    g = make_grid(ad.convention, 24, "auto")
    noise = ad.noise(8, 0)
    target = rollout(ad, "heun", g, x=noise)
    path = [0, 6, 12, 18, 24]
    states: list[dict] = []
    kw = dict(candidates=5, max_sweeps=3, free_start=True, moves=moves)
    full = refine_final_error(ad, "ddim", g, path, noise, target, on_node=states.append, **kw)
    assert len(states) >= 4 and full[0] != path  # it moved, so the resumes below have work left to redo
    for st in states:
        x, node_states = rollout(ad, "ddim", [g[i] for i in st["path"]], x=noise, keep=True)
        got = refine_final_error(ad, "ddim", g, st["path"], noise, target, start=(st["best"], node_states),
                                 resume=st, **kw)
        assert got == full, st
    with pytest.raises(StepsmithError, match="another path"):
        refine_final_error(ad, "ddim", g, path, noise, target, resume={**states[-1], "path": [0, 1, 2, 3, 24]}, **kw)


def test_the_resume_benchmark_runs_and_checks_its_tables():
    from benchmarks.resume import ResumeConfig, run

    res = run(ResumeConfig(model=TOY, solver="euler", nfe=3, samples=8, options={"grid": 20}, kill_at=0.7))
    assert res["resumed"]["same_table"] and res["with_checkpoint"]["same_table"]
    assert res["resumed"]["model_calls"] < res["plain"]["model_calls"]
    assert res["resumed"]["table_model_calls"] == res["resumed"]["saved_model_calls"] + res["resumed"]["model_calls"]


# --------------------------------------------------------------------------- ays

AYS = dict(samples=8, draws=1, candidates=4, max_sweeps=3, teacher_steps=12)


@pytest.mark.parametrize("opts", [{}, {"small": "direct", "last": "sigma_min", "early_stop": False}])
def test_ays_killed_anywhere_resumes_to_the_same_tables(tmp_path, opts):
    o = {**AYS, **opts}
    ad = load_model(TOY)
    full = make_tables(ad, "ays", [2, 4, 6], "euler", **o)
    n = ad.calls
    ref = 2 * o["teacher_steps"]  # the reference pass (Heun) must fit between two kills
    for frac in (0.02, 0.45, 0.85):  # in the reference pass, the 10-step stage, the subdivisions, the last budget
        ck = tmp_path / f"ays-{frac}.pt"
        got, kills = run_until_done(TOY, [2, 4, 6], "euler", ck, int(n * frac), ref + n // 5, method="ays", **o)
        assert kills >= 1 and all(got[k].sigmas == full[k].sigmas and got[k].objective == full[k].objective
                                  and got[k].provenance["history"] == full[k].provenance["history"] for k in got), frac


def test_ays_resumed_search_spends_only_what_was_left(tmp_path):
    ad = load_model(TOY)
    full = make_table(ad, "ays", 6, **AYS)
    n = ad.calls
    ck = tmp_path / "ays.pt"
    with pytest.raises(Killed):
        make_table(killed_after(load_model(TOY), int(n * 0.7)), "ays", 6, checkpoint=str(ck), **AYS)
    saved = torch.load(ck, weights_only=True)
    assert saved["format"] == checkpoint_format("ays") and "target" in saved["state"]["reference"]
    second = load_model(TOY)
    resumed = make_table(second, "ays", 6, checkpoint=str(ck), **AYS)
    assert resumed.sigmas == full.sigmas
    # what was left, and again the KLUB's anchor evaluations it had cached (at most one per node and candidate of
    # the 41-point level), which a checkpoint does not keep
    left = n - saved["spent"]["model_calls"]
    assert left <= second.calls <= left + 41 * (AYS["candidates"] + 1) < n
    assert resumed.provenance["resumed"]["model_calls"] == saved["spent"]["model_calls"]
    assert resumed.provenance["model_calls"] == saved["spent"]["model_calls"] + second.calls


def test_ays_checkpoint_holds_only_for_its_data_and_method(tmp_path):
    ck = tmp_path / "ays.pt"
    data = torch.randn(64, 2)
    make_table(load_model(TOY), "ays", 4, checkpoint=str(ck), data=data, **AYS)
    ad = load_model(TOY)
    with pytest.raises(StepsmithError, match="another search"):
        make_table(ad, "ays", 4, checkpoint=str(ck), data=data + 1, **AYS)
    with pytest.raises(StepsmithError, match="not a checkpoint of method dp"):
        make_table(ad, "dp", 4, checkpoint=str(ck), **OPTS)
    assert ad.calls == 0


def test_coordinate_descent_resumed_from_any_step_ends_the_same():
    from schedules.search.ays import KLUB, coordinate_descent

    ad = load_model(TOY)
    klub = KLUB(ad, torch.randn(16, 2), draws=1, seed=0)
    ts = [80.0, 20.0, 5.0, 1.0, 0.2, 0.05, 0.01]
    free = list(range(1, len(ts) - 1))

    def metric(t: list[float]) -> float:  # a sample metric of the schedule alone, so a resume sees the same values
        return sum(math.log(a / b) ** 2 for a, b in zip(t, [80.0, 12.0, 3.0, 0.8, 0.3, 0.05, 0.01]))

    states: list[dict] = []
    full = coordinate_descent(klub, ts, free, candidates=4, max_sweeps=6, metric=metric, on_step=states.append)
    assert len(states) > len(free) and states[-1]["done"]
    for st in states:
        got = coordinate_descent(klub, ts, free, candidates=4, max_sweeps=6, metric=metric, resume=st)
        assert got == full, st
