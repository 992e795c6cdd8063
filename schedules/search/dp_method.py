"""``method="dp"``: teacher-state DP, student-state DP and final-error refinement behind one function.

Modes (option ``mode``):

* ``"teacher"`` — plain BOSS/GITS DP on teacher states (local one-step errors).
* ``"student"`` — OSS student-state DP (cost = error of the student's own states).
* ``"refined"`` (default) — the product default. Candidates: the teacher-DP table, the
  student-DP table (not for Heun: its corrections would cost n² calls per level) and the
  model's diffusers default / uniform spacing snapped to the grid; the one with the lowest
  final-sample error against the teacher on the search samples seeds a coordinate descent
  (:func:`~schedules.search.dp.refine_final_error`). With ``free_start`` (default) the first
  node may move as well, and diffusers' 'leading' spacing is one of the seeds: starting below
  σ_max (noise read as a later state) can cut the final error of few-step samplers. Plain local DP
  loses to diffusers' defaults on final-sample error, because local errors are not how errors add up
  over a few large steps; this mode optimises what is measured.

Several processes (``accelerate launch``, or any initialised torch.distributed group) split the
reference trajectories and the cost accumulation and sum-reduce the cost matrix; the student
DP and the refinement then run identically on every rank.
"""

from __future__ import annotations

import time

import torch

from schedules.baselines import BASELINES, steps_for
from schedules.io import StepsmithError
from schedules.search.common import final_mse_kind, make_grid, snap_path
from schedules.search.dp import final_error, refine_final_error, student_dp, teacher_dp
from schedules.search.evolution import snap_genome
from schedules.table import TimestepTable

MODES = ("refined", "teacher", "student")


def grid_provenance(grid: list[float], kind: str, conv) -> dict:
    d = {"nodes": len(grid), "kind": kind, "convention": conv.name}
    if conv.discrete_timesteps is not None:  # grids of discrete-time models sit on integer timesteps
        d["timesteps"] = [round(float(t)) for t in conv.model_time(torch.tensor(grid[:-1], dtype=torch.float64))]
    return d


def refinement_starts(adapter, nfe: int, solver: str, g: list[float], paths: dict[str, list[int]],
                      free_start: bool) -> dict[str, list[int]]:
    """Candidate starting paths of the refinement: the DP paths, and the diffusers default / uniform
    (and, with ``free_start``, 'leading') baselines snapped to the grid."""
    n = len(g) - 1
    starts = dict(paths)
    for b in ("default", "uniform") + (("leading",) if free_start else ()):
        tb = BASELINES[b](adapter, nfe, solver)
        starts[b] = (list(snap_genome(g, tb.sigmas, n, False)) + [n]) if free_start else snap_path(g, tb.sigmas)
    return starts


def dp_table(adapter, nfe: int, solver: str = "euler", *, samples: int = 64, seed: int = 0, progress: bool = False,
             mode: str = "refined", grid: int | None = None, grid_kind: str = "auto", micro_batch: int = 16,
             late_weight: float = 1.0, substeps: int = 1, candidates: int = 12, max_sweeps: int = 4,
             free_start: bool = True) -> TimestepTable:
    """The ``dp`` table of ``mode`` for ``nfe`` evaluations on a ``grid``-interval grid (see the module docstring)."""
    if mode not in MODES:
        raise StepsmithError(f"unknown dp `mode` {mode!r}; use one of {', '.join(MODES)}", param="mode")
    if not late_weight > 0:
        raise StepsmithError(f"`late_weight` must be positive, got {late_weight}", param="late_weight")
    K = steps_for(adapter, nfe, solver)
    n = int(grid or (100 if solver != "heun" else 50))
    g = make_grid(adapter.convention, n, grid_kind)
    n = len(g) - 1
    if K > n:
        raise StepsmithError(f"NFE {nfe} ({K} steps with {solver}) does not fit a grid of {n + 1} nodes; "
                             "lower `nfe` or raise `grid`", param="grid")
    noise = adapter.noise(samples, seed)
    t0 = time.perf_counter()
    need_states = mode == "student" or (mode == "refined" and solver != "heun")
    dps = teacher_dp(adapter, noise, g, solver, K, micro_batch=micro_batch, late_weight=late_weight,
                     substeps=substeps, progress=progress, keep_states=need_states)
    if K not in dps.result.paths:
        raise StepsmithError(f"no {K}-step path on the grid; raise `grid`", param="grid")
    prov: dict = {"grid": grid_provenance(g, grid_kind, adapter.convention), "mode": mode,
                  "reference_seconds": round(dps.ref_seconds, 3), "dp_seconds": round(dps.dp_seconds, 3),
                  "dp_over_reference": round(dps.dp_seconds / max(dps.ref_seconds, 1e-9), 3),
                  "micro_batch": micro_batch, "late_weight": late_weight, "teacher": dps.teacher.describe(),
                  "processes": dps.extra["world"], "reference_calls": dps.model_calls}
    target = dps.teacher_final
    path = dps.result.paths[K]
    objective = dps.result.costs[K]
    if need_states:
        st = student_dp(adapter, noise, g, solver, K, dps.extra["states"], progress=progress)
        if mode == "student":
            path, objective = st.paths[K], st.costs[K]
    if mode == "refined":
        dp_paths = {"dp-teacher": dps.result.paths[K]} | ({"dp-student": st.paths[K]} if solver != "heun" else {})
        starts = refinement_starts(adapter, nfe, solver, g, dp_paths, free_start)
        errs = {name: final_error(adapter, solver, [g[i] for i in p], noise, target) for name, p in starts.items()}
        start = min(errs, key=errs.get)
        path, objective, sweeps = refine_final_error(adapter, solver, g, starts[start], noise, target,
                                                     candidates=candidates, max_sweeps=max_sweeps,
                                                     free_start=free_start, progress=progress)
        prov.update(start=start, free_start=free_start, start_final_errors={k: float(v) for k, v in errs.items()},
                    sweeps=sweeps, objective_kind=final_mse_kind(dps.teacher))
    else:
        prov["objective_kind"] = f"dp path cost (mean squared one-step error vs {dps.teacher.name})" \
            if mode == "teacher" else final_mse_kind(dps.teacher)
    prov["search_seconds"] = round(time.perf_counter() - t0, 3)
    prov["path"] = path
    return TimestepTable.from_sigmas([g[i] for i in path], convention=adapter.convention,
                                     prediction=adapter.prediction, solver=solver, method="dp", model=adapter.name,
                                     objective=objective, provenance=prov)
