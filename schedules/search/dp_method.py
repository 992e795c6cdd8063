"""``method="dp"``: teacher-state DP, student-state DP and final-error refinement behind one function.

Modes (option ``mode``):

* ``"teacher"`` — plain BOSS/GITS DP on teacher states (local one-step errors).
* ``"student"`` — OSS student-state DP (cost = error of the student's own states).
* ``"refined"`` (default) — the product default. Candidates: the teacher-DP table, the
  student-DP table (option ``student_start``, default on; never for Heun: its corrections would
  cost n² calls per level; option ``student_corridor``, default 2: an iterated corridor student DP
  around the teacher-DP path, see below) and every diffusers spacing (:data:`START_SPACINGS`) snapped to the grid;
  the one with the lowest final-sample error against the teacher on the search samples seeds a
  coordinate descent (:func:`~schedules.search.dp.refine_final_error`, option ``moves``, default ``auto``: a
  pattern search below 8 steps), so the table is never worse on the search objective than any of those spacings.
  With ``free_start`` (default) the first node may move as well, and diffusers' 'leading' spacing
  is one of the seeds: starting below σ_max (noise read as a later state) can cut the final error
  of few-step samplers. Plain local DP
  loses to diffusers' defaults on final-sample error, because local errors are not how errors add up
  over a few large steps; this mode optimises what is measured.

Refinement defaults (measured; issues 12 and 16). Search on seed 0 with 32 samples, grid 60,
candidates 6, max_sweeps 2 (the bench's dp options); FID on the held-out seed 10000, N = 500
(``stepsmith eval --num 500 --seed 10000 --no-teacher``; the old default reproduces the committed P1
cells exactly: digits-ddpm DDIM 272.68 / 148.48 / 88.72 at NFE 4 / 6 / 8). FID old → new ("kept": the
old moves from the same seed; digits-ddpm NFE 8 re-run gives the old path):

=====================  ===================  ===================  ===================
config                 NFE 4                NFE 6                NFE 8
=====================  ===================  ===================  ===================
digits-ddpm DDIM       272.7 → 254.3        148.5 → 129.8        88.72 (kept)
sharp-ddpm DDIM        74.01 → 69.08        65.17 → 65.23        59.52 (kept)
digits-flow Euler      189.8 → 172.5        126.4 → 123.8        103.5 (kept)
=====================  ===================  ===================  ===================

* Every diffusers spacing seeds the refinement (one rollout each): digits-ddpm DDIM NFE 6 now beats
  'trailing' (129.8 vs 147.8). toy2d-flow Euler NFE 8 still loses to 'leading' (W2 0.2136 vs 0.1993):
  the refinement starts from 'leading' and moves away on its objective (teacher-mse), which does not
  rank tables by W2 there.
* ``moves="auto"``: the pattern search below 8 steps. At 8 steps it lost held-out FID on digits-ddpm
  DDIM (99.61 from the student-DP start, 94.44 with ``coarse-fine``, vs 88.72 with ``candidates``),
  though it tied on digits-flow Euler (103.7 vs 103.5), so 8 steps and more keep ``candidates``.
* ``student_start`` stays on: without the student-DP seed the search is about half as many model
  calls (digits-ddpm DDIM NFE 4 / 6 / 8: 345 / 446 / 550 calls, 1.8 / 2.7 / 3.8× the reference pass,
  vs 561 / 806 / 1094, 3.1 / 5.3 / 10.4×; the old default's 10.4× was timed under a different machine
  load, so compare the calls), but held-out FID drops at 6–8 steps (digits-flow Euler NFE 6 / 8:
  129.7 / 110.2 vs 126.4 / 103.5; digits-ddpm DDIM NFE 8: 99.82 vs 88.72). With it, the new default
  costs about as much as the old: model calls digits-ddpm DDIM NFE 4 / 6 / 8: 524 / 707 / 1054 vs
  561 / 806 / 1094; sharp-ddpm DDIM NFE 4 / 6: 589 / 769 vs 564 / 824; digits-flow Euler NFE 4 / 6:
  532 / 717 vs the committed 586 / 848. The student DP, K·n calls, is the largest cost; the issue-12
  target (≤ 2.5× the reference pass) is met only with ``student_start=False`` at NFE 4 (digits-ddpm
  1.8×, digits-flow 2.0×; sharp-ddpm 2.7×).
  ``student_start=False`` is the cheap setting (held-out FID at NFE 4 was still better than the old
  default everywhere: 254.3 / 69.08 / 179.0).

Corridor student DP (option ``student_corridor``, default 2; measured, issue 12). The full student DP
evaluates the model at every reached node of every level (≈ K·n calls, and O(n²) jumps and errors per
level); :func:`~schedules.search.dp.student_dp_corridor` keeps level k to the nodes within 2 of the k-th
node of the teacher-DP path and re-centres on its answer until no node moves by 2 or more (≈ K·5 calls a
round, 1–6 rounds measured). ``student_corridor=0`` (or None) runs the full DP. A single corridor round
(no re-centring) lost at 8 steps: digits-flow Euler NFE 8 FID 106.5 vs 103.5 (its student start, feature-mse
0.716 vs the full DP's 0.531; half-width 4: 0.638; 8: another table again); re-centred, half-width 2 reaches the
full DP's student path there. Same measurement as above (bench dp options, search seed 0, 32 samples; FID
seed 10000, N = 500; ``stepsmith eval --model builtin:digits-ddpm --solver ddim --methods dp --nfe 4,6,8
--num 500 --seed 10000 --search-samples 32 --no-teacher --grid 0 --option grid=60 --option candidates=6
--option max_sweeps=2``, and ``--option student_corridor=0`` for the full DP). FID full → corridor, model
calls full → corridor, and search ÷ reference pass full → corridor in CPU seconds (the P3 ratio in
process time, both run interleaved in one single-threaded process: the machine was shared and its load
varied, which moved wall-clock ratios by up to 1.8× — the ``stepsmith eval`` run gave the corridor 1.85 / 2.72 / 8.2
and 2.14 / 3.34 / 10.8 — while the wall ratios of the interleaved run were within 0.7 of these, most within 0.1):

=====================  ==================================  ==================================  ==================================
config                 NFE 4                               NFE 6                               NFE 8
=====================  ==================================  ==================================  ==================================
digits-ddpm DDIM       254.31 (same path); 520 → 361;      129.84 (same path); 699 → 439;      88.72 (same path); 1046 → 725;
                       3.19 → 2.00×                        4.70 → 2.61×                        7.36 → 4.98×
digits-flow Euler      172.50 → 172.02; 528 → 381;         123.77 (same path); 709 → 501;      103.48 (same path); 1074 → 897;
                       3.30 → 2.22×                        4.89 → 3.17×                        7.16 → 5.96×
=====================  ==================================  ==================================  ==================================

sharp-ddpm DDIM (search only): the same tables at NFE 4 / 6 / 8 (so the same FID), 585 / 763 / 1106 →
506 / 555 / 1001 calls, 4.02 / 6.21 / 8.47 → 3.58 / 3.75 / 8.26×. Corridor rounds: digits-ddpm 1 / 1 / 2,
digits-flow 3 / 3 / 6 (at most :data:`~schedules.search.dp.CORRIDOR_ROUNDS`). Half-width 4 costs more almost everywhere
(373 / 459 / 717 and 465 / 515 / 872 calls) for the same tables, except digits-flow NFE 4, where it finds
the full DP's student path (feature-mse 2.317; half-width 2: 2.506) and its table (FID 172.50): half-width 2's
table there scores 172.02, a noise-level difference. Both columns include the refinement's exact savings:
the chosen start's rollout is reused (K calls), and a later sweep skips a node when no other node moved
since its last search (same argmin; the code before them spent 524 / 707 / 1054 and 532 / 717 / 1082 calls for the same tables). The
refinement is now the largest item at 8 steps (``candidates``, 2 sweeps, ≈ 400 calls): one sweep would save
≈ 180 calls, but its tables score worse on the search objective (digits-flow 0.397 vs 0.384,
digits-ddpm 0.854 vs 0.813), so the issue-12 target (≤ 2.5×) is met at NFE 4 only.

Search budget (option ``max_cost``, default None: unbounded; measured, issue 12). ``max_cost=2.5`` stops the
refinement once the whole search has spent 2.5 reference passes, counted in model evaluations per search sample
(the reference pass's per-sample evaluations × max_cost; the starts' rollouts and the student DP run first and
are not cut, so a search whose student DP alone passes the budget runs no refinement). Stopping keeps the best
path so far, never worse on the objective than the chosen start. Same measurement as the corridor table (bench
dp options; CPU ratio of one single-threaded process; FID seed 10000, N = 500), NFE 4 / 6 / 8 / 10, default →
``max_cost=2.5``:

=====================  ==========================================  ==========================================
config                 search ÷ reference pass (CPU)               held-out FID
=====================  ==========================================  ==========================================
digits-ddpm DDIM       2.0 / 2.58 / 5.38 / 6.64 → 2.01 / 2.35 /    254.31 / 129.84 / 88.72 / 76.64 →
                       2.51 / 2.55                                 254.31 / 129.84 / 104.54 / 83.03
digits-flow Euler      2.2 / 3.07 / 8.01 / 5.53 → 2.1 / 2.37 /     172.02 / 123.77 / 103.48 / 96.56 →
                       3.24 / 2.42                                 172.02 / 126.0 / 108.72 / 96.65
=====================  ==========================================  ==========================================

So the budget costs held-out quality at 8–10 steps (digits-ddpm DDIM NFE 8 +18 %), and the default stays
unbounded. digits-flow NFE 8 passes 2.5 because its corridor student DP took 6 rounds before the refinement.
The loss is not one search seed's draw: at NFE 8 on search seeds 1 / 2 (``dp_table(..., seed=s)``, otherwise the
same), default → capped FID is 97.30 → 105.11 and 91.19 → 114.60 on digits-ddpm DDIM, 105.57 → 107.23 and
106.03 → 109.15 on digits-flow Euler. Searching the nodes last-first (the short tails first, so the budget covers
more nodes) did not help: capped, digits-ddpm NFE 8 / 10 100.31 / 83.03 and digits-flow 108.72 / 96.86; uncapped it
lost (digits-ddpm NFE 8 103.70 vs 88.72, digits-flow 105.79 vs 103.48), so the nodes stay first to last.
Leaving the student DP's calls to the capped refinement (``student_start=False``) lost too: NFE 4 / 8 / 10 FID
digits-ddpm 298.53 / 108.14 / 87.22, digits-flow 179.03 / 119.18 / 97.34 (capped with the student start: 254.31 /
104.54 / 83.03 and 172.02 / 108.72 / 96.65).
One refinement sweep (``max_sweeps=1``) found the default's tables at NFE 6 (its second sweep only confirms)
but lost at 8 (DDIM 95.02, flow 104.57); no refinement (``max_sweeps=0``) lost everywhere (DDIM 147.5 / 100.3 /
83.0, flow 135.1 / 108.7 / 96.9 at NFE 6 / 8 / 10).

Second start (option ``second_start``, default ``auto``: below :data:`PATTERN_BELOW_STEPS` steps; measured,
issue 12). The refinement is a local search, and the level its first node starts at is the coordinate it moves
worst: on digits-ddpm DDIM every start refined on its own (same bench options, search seed 0, 32 samples) ends
at feature-mse 3.50 from the DP paths and 'trailing' but 2.19 from 'leading' (the scheduler default, first node
18 of 60) at NFE 4, 1.52 vs 1.13 at NFE 6. So the best start at another start level is refined as well, when
its start error is within :data:`SECOND_START_WITHIN` (1.25) of the best start's, and the better result wins:
never worse on the objective than refining the best start alone. Held-out FID (seed 10000, N = 500) digits-ddpm
DDIM NFE 4 / 6: 254.31 / 129.84 → **195.72 / 113.65** (dp-gits 248.6 at NFE 4), for 483 / 623 model calls
instead of 361 / 439; NFE 2 (DDIM, and DPM++(2M), whose two steps are DDIM's there): 722.96 → 500.53, feature-mse
12.73 → 7.74 (the bench run of this change: the same search on teacher-mse, row dp-teacher-mse, went 221.55 → 193.37 at
DDIM NFE 4; every other dp cell of the six configurations kept its value). Without the 1.25 bound the second
start also ran on digits-flow Euler, where it ended worse (2.72 vs 1.30 at NFE 4, 0.97 vs 0.64 at NFE 6) for
117 / 236 extra calls; with it digits-flow Euler and sharp-ddpm DDIM at NFE 4 / 6 keep their tables and cost
(digits-flow NFE 2 refines a second start for 77 more calls and keeps its table).
From 8 steps on the candidate refinement costs 3–4 times more, so ``auto`` leaves it off there (``True``
turns it on). Tried in the same measurement and left out: refining every start (DDIM NFE 4: 889 calls, 6.6× the
reference pass); a rescale move that shifts the first node and stretches the path with it (DDIM NFE 4 2.31, but
digits-flow Euler NFE 4 / 6 ended worse, 1.45 / 0.74); a start from GITS' discounted Bellman pass on the same
costs (1.15: feature-mse 3.32 but held-out FID 269.2); screening each trial on 8 or 16 of the 32 samples and
running only the subset's best on all (2.95–3.9× instead of 5.2–5.9× at NFE 8, but FID 100.3 vs 88.72 on
digits-ddpm DDIM and 107.5 vs 103.5 on digits-flow Euler); every other baseline (EDM/Karras, log-SNR, published AYS,
...) as a further start, one rollout each (bench run: digits-flow Euler kept every table for 28–83 more calls,
digits-ddpm DPM++(2M) kept NFE 4 at 103.4, where published AYS scores 77.9, and lost NFE 10, 54.88 vs 51.30).

Published variants (option ``variant``), each run as its authors define it (:data:`VARIANTS`):
``boss``, ``gits``, ``gits-sd`` and ``oss``. Several budgets come out of one pass with
:func:`dp_tables` (one reference pass, one Bellman pass; only the refinement runs per budget).

Resumable (option ``checkpoint=PATH``, :mod:`schedules.search.resume`): the search saves its state atomically
after the shared pass (the teacher-DP and student-DP paths and costs of every budget, the teacher's final samples,
the pass's calls and seconds; not the cost matrices or teacher states, which nothing after the pass reads), after
the start rollouts of a budget (each start's final error), after every node search of the refinement (the whole
coordinate-descent state, :func:`~schedules.search.dp.refine_final_error`'s ``on_node``) and after each finished
budget (its table). Started again with the same checkpoint, the search ends with exactly the tables of an
uninterrupted run: the node states of the path being refined are rebuilt by one rollout (K model calls, the only
work done twice), and rollouts are deterministic for the same noise and path.

Several processes (``accelerate launch``, or any initialised torch.distributed group) split the
reference trajectories and the cost accumulation and sum-reduce the cost matrix; the student
DP and the refinement then run identically on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from schedules.baselines import BASELINES, steps_for
from schedules.conditioning import micro_batches
from schedules.io import StepsmithError
from schedules.search.common import final_mse_kind, make_grid, rollout, search_teacher, snap_path
from schedules.search.dp import (
    REFINE_MOVES,
    BellmanResult,
    CorridorResult,
    DPSearch,
    aggregate_paths,
    final_error,
    refine_final_error,
    student_dp,
    student_dp_corridor,
    student_dp_per_sample,
    teacher_dp,
    teacher_reference,
)
from schedules.search.evolution import data_key, snap_genome
from schedules.search.objectives import DEFAULT_OBJECTIVE, make_scorer, objective_kind, resolve_objective
from schedules.search.resume import SearchCheckpoint, checkpoint_key, open_checkpoint
from schedules.table import TimestepTable
from schedules.teacher import Teacher

MODES = ("refined", "teacher", "student")


def grid_provenance(grid: list[float], kind: str, conv) -> dict:
    d = {"nodes": len(grid), "kind": kind, "convention": conv.name}
    if conv.discrete_timesteps is not None:  # grids of discrete-time models sit on integer timesteps
        d["timesteps"] = [round(float(t)) for t in conv.model_time(torch.tensor(grid[:-1], dtype=torch.float64))]
    return d


START_SPACINGS = ("default", "uniform", "leading", "trailing", "linspace")


def refinement_starts(adapter, nfe: int, solver: str, g: list[float], paths: dict[str, list[int]],
                      free_start: bool) -> dict[str, list[int]]:
    """Candidate starting paths of the refinement: the DP paths, and every diffusers spacing
    (:data:`START_SPACINGS`: the scheduler default, uniform, leading, trailing, linspace) snapped to the
    grid — with ``free_start`` the first node snaps too, else it stays at the grid's start. A spacing
    that snaps to a path already listed is left out (it would cost a rollout for nothing)."""
    n = len(g) - 1
    starts = dict(paths)
    for b in START_SPACINGS:
        tb = BASELINES[b](adapter, nfe, solver)
        p = (list(snap_genome(g, tb.sigmas, n, False)) + [n]) if free_start else snap_path(g, tb.sigmas)
        if p not in starts.values():
            starts[b] = p
    return starts


@dataclass(frozen=True)
class DPVariant:
    """A published DP over steps, as its authors define it: teacher, grid, cost, recursion, aggregation."""

    name: str
    paper: str
    mode: str  # "teacher": Bellman on teacher-state costs; "student": OSS's per-sample student-state DP
    teacher_solver: str  # the reference trajectory's solver, run on the grid itself
    grid: int  # intervals of the reference grid
    grid_kind: str  # "uniform" (in the model's own time) or "rho" (EDM ρ = 7)
    late_weight: float = 1.0  # GITS' discount coefficient (1: plain sum)
    metric: str = "mse"  # per-sample one-step error: mean squared ("mse") or Euclidean norm ("l2")
    reduce: str = "median"  # student mode: per-step aggregation of the per-sample paths


VARIANTS: dict[str, DPVariant] = {
    "boss": DPVariant("boss", "Nguyen et al. 2024, 'Bellman Optimal Stepsize Straightening of Flow-Matching Models' "
                      "(BOSS): 100-step Euler teacher on a uniform grid, one Euler jump from teacher states, mean "
                      "squared error, plain sum", "teacher", "euler", 100, "uniform"),
    "gits": DPVariant("gits", "Chen et al. 2024, 'On the Trajectory Regularity of ODE-based Diffusion Sampling' (GITS): "
                      "60-step iPNDM teacher on the EDM rho=7 grid, one Euler jump from teacher states, l2 cost, "
                      "V[j][k] = min_i c[j][i] + 1.15 V[i][k-1]", "teacher", "ipndm", 60, "rho", 1.15, "l2"),
    "gits-sd": DPVariant("gits-sd", "GITS with the discount 1.20 its authors use for Stable Diffusion", "teacher",
                         "ipndm", 60, "rho", 1.20, "l2"),
    "oss": DPVariant("oss", "Wang et al. 2025, 'Optimal Stepsize for Diffusion Sampling' (OSS): 200-step Euler "
                     "teacher, per-sample DP over the student's own Euler states, per-step median over samples "
                     "(OSS-ave)", "student", "euler", 200, "auto"),
}


def variant_grid(adapter, kind: str, n: int) -> list[float]:
    """The variant's reference grid: the convention's grid, or EDM ρ = 7 (flow: the karras baseline on σ)."""
    if kind == "rho" and adapter.convention.discrete_timesteps is None:
        return BASELINES["karras"](adapter, n, "euler").sigmas
    return make_grid(adapter.convention, n, kind)


def _variant_paths(adapter, v: DPVariant, g: list[float], noise, Ks: list[int], w: float, micro_batch: int,
                   reduce: str) -> tuple[dict[int, list[int]], dict[int, float | None], dict, Teacher, torch.Tensor]:
    """Paths per budget, the variant's own objective (None: computed later), provenance, teacher, teacher finals."""
    teacher = Teacher.on_grid(g, v.teacher_solver, label=f"{v.name}-grid")
    calls0 = getattr(adapter, "calls", 0)
    if v.mode == "teacher":
        dps = teacher_dp(adapter, noise, g, "euler", max(Ks), micro_batch=micro_batch, late_weight=w,
                         teacher=teacher, metric=v.metric)
        missing = [K for K in Ks if K not in dps.result.paths]
        if missing:
            raise StepsmithError(f"no {missing[0]}-step path on the grid; raise `grid`", param="grid")
        # GITS weighs step m (from the start) by w^m; bellman_all weighs it by w^(m-K+1): same argmin
        objs = {K: dps.result.costs[K] * w ** (K - 1) for K in Ks}
        return ({K: dps.result.paths[K] for K in Ks}, objs, {"reference_calls": dps.model_calls}, teacher,
                dps.teacher_final)
    ref = teacher_reference(adapter, noise, g, teacher)
    ref_calls = getattr(adapter, "calls", 0) - calls0
    per = student_dp_per_sample(adapter, noise, g, Ks, ref.x)
    paths = {K: aggregate_paths(per[K], reduce) for K in Ks}
    return paths, dict.fromkeys(Ks), {"reference_calls": ref_calls}, teacher, ref.x[-1]


def variant_tables(adapter, nfes: list[int], solver: str, v: DPVariant, *, samples: int, seed: int,
                   grid: int | None, late_weight: float | None, micro_batch: int, reduce: str | None,
                   grid_kind: str | None = None) -> dict[int, TimestepTable]:
    """The tables of a published variant for every budget of ``nfes`` from one pass (see :data:`VARIANTS`)."""
    w = v.late_weight if late_weight is None else float(late_weight)
    how = reduce or v.reduce
    Ks = {nfe: steps_for(adapter, nfe, solver) for nfe in nfes}
    g = variant_grid(adapter, grid_kind or v.grid_kind, int(grid or v.grid))
    if max(Ks.values()) > len(g) - 1:
        raise StepsmithError(f"NFE {max(nfes)} does not fit the {v.name} grid of {len(g)} nodes; raise `grid`",
                             param="grid")
    noise = adapter.noise(samples, seed)
    t0, calls0 = time.perf_counter(), getattr(adapter, "calls", 0)
    paths, objs, shared, teacher, target = _variant_paths(adapter, v, g, noise, sorted(set(Ks.values())), w,
                                                          micro_batch, how)
    pass_calls, pass_seconds = getattr(adapter, "calls", 0) - calls0, time.perf_counter() - t0
    out = {}
    for nfe, K in Ks.items():
        calls_k = getattr(adapter, "calls", 0)
        sig = [g[i] for i in paths[K]]
        obj = objs[K] if objs[K] is not None else final_error(adapter, solver, sig, noise, target)
        kind = (f"{v.name} dp path cost ({'discounted ' if w != 1 else ''}sum of per-sample {v.metric} one-step "
                f"Euler errors vs {teacher.name})") if v.mode == "teacher" else final_mse_kind(teacher)
        prov = {"variant": v.name, "paper": v.paper, "mode": v.mode, "late_weight": w, "metric": v.metric,
                "grid": grid_provenance(g, grid_kind or v.grid_kind, adapter.convention),
                "teacher": teacher.describe(), "objective_kind": kind, "path": paths[K],
                **shared, "search_seconds": round(time.perf_counter() - t0, 3)}
        if v.mode == "student":
            prov["reduce"] = how
        if len(nfes) > 1:
            prov.update(model_calls=getattr(adapter, "calls", 0) - calls_k, shared_pass={
                "shared": True, "nfe": nfes, "model_calls": pass_calls, "seconds": round(pass_seconds, 3),
                "note": "one reference (and DP) pass for every budget; model_calls excludes it"})
        out[nfe] = TimestepTable.from_sigmas(sig, convention=adapter.convention, prediction=adapter.prediction,
                                             solver=solver, method="dp", model=adapter.name, objective=obj,
                                             provenance=prov)
    return out


PATTERN_BELOW_STEPS = 8
SECOND_START_WITHIN = 1.25  # a second start is refined only when its error is within this factor of the best's
STUDENT_CORRIDOR: int | None = 2  # the student DP's default corridor half-width in grid nodes (module docstring)


def auto_moves(K: int) -> str:
    """The refinement's moves for ``moves="auto"``: the pattern search below :data:`PATTERN_BELOW_STEPS` steps,
    the evenly spread candidates from there on (measured, module docstring)."""
    return "pattern" if K < PATTERN_BELOW_STEPS else "candidates"


@dataclass
class _Shared:
    """The one pass every budget of a dp search shares: grid, noise, teacher DP (all budgets), student DP."""

    g: list[float]
    noise: torch.Tensor
    dps: object
    st: object
    seconds: float
    calls: int
    corridor: int | None = None  # the student DP's corridor half-width (None: the full DP, or none ran)


def _shared_pass(adapter, Ks: list[int], solver: str, *, samples, seed, progress, mode, grid, grid_kind,
                 micro_batch, late_weight, substeps, student_start, student_corridor=None) -> _Shared:
    n = int(grid or (100 if solver != "heun" else 50))
    g = make_grid(adapter.convention, n, grid_kind)
    n = len(g) - 1
    K = max(Ks)
    if K > n:
        raise StepsmithError(f"NFE ({K} steps with {solver}) does not fit a grid of {n + 1} nodes; "
                             "lower `nfe` or raise `grid`", param="grid")
    noise = adapter.noise(samples, seed)
    calls0, t0 = getattr(adapter, "calls", 0), time.perf_counter()
    need_states = mode == "student" or (mode == "refined" and student_start and solver != "heun")
    dps = teacher_dp(adapter, noise, g, solver, K, micro_batch=micro_batch, late_weight=late_weight,
                     substeps=substeps, progress=progress, keep_states=need_states)
    for k in Ks:
        if k not in dps.result.paths:
            raise StepsmithError(f"no {k}-step path on the grid; raise `grid`", param="grid")
    corridor = int(student_corridor) if student_corridor and mode == "refined" and need_states else None
    if corridor:  # only nodes near the teacher-DP paths of the budgets asked for, re-centred (module docstring)
        st = student_dp_corridor(adapter, noise, g, solver, {k: dps.result.paths[k] for k in Ks}, dps.extra["states"],
                                 corridor, progress=progress)
    else:
        st = student_dp(adapter, noise, g, solver, K, dps.extra["states"], progress=progress) if need_states else None
    return _Shared(g, noise, dps, st, time.perf_counter() - t0, getattr(adapter, "calls", 0) - calls0, corridor)


def _finish(adapter, nfe: int, K: int, solver: str, sh: _Shared, *, mode, grid_kind, micro_batch, late_weight,
            candidates, max_sweeps, free_start, progress, objective_name="teacher-mse", features=None,
            moves="auto", max_cost: float | None = None, second_start: bool | str = "auto",
            ck: SearchCheckpoint | None = None) -> TimestepTable:
    """One budget's table from the shared pass (the refinement, in the default mode). ``ck`` saves the
    refinement's progress and resumes it (module docstring)."""
    moves = auto_moves(K) if moves == "auto" else moves
    g, dps, noise = sh.g, sh.dps, sh.noise
    t0 = time.perf_counter()
    ck = ck or SearchCheckpoint(None, "dp", "")
    rec = _budget_state(ck, nfe)
    base, prior_calls, prior_rebuild, rebuilt = getattr(adapter, "calls", 0), rec["calls"], rec["rebuild"], 0

    def total() -> int:  # model calls this budget has spent, over every run of a resumed search
        return prior_calls + getattr(adapter, "calls", 0) - base

    def mark() -> None:
        rec["calls"], rec["rebuild"] = total(), prior_rebuild + rebuilt

    def rebuild(p: list[int]) -> list:  # node states of path p after a resume (its rollout is deterministic)
        nonlocal rebuilt
        c0 = getattr(adapter, "calls", 0)
        states = rollout(adapter, solver, [g[i] for i in p], x=noise, keep=True)[1]
        rebuilt += getattr(adapter, "calls", 0) - c0
        return states
    prov: dict = {"grid": grid_provenance(g, grid_kind, adapter.convention), "mode": mode,
                  "reference_seconds": round(dps.ref_seconds, 3), "dp_seconds": round(dps.dp_seconds, 3),
                  "dp_over_reference": round(dps.dp_seconds / max(dps.ref_seconds, 1e-9), 3),
                  "micro_batch": micro_batch, "late_weight": late_weight, "teacher": dps.teacher.describe(),
                  "processes": dps.extra["world"], "reference_calls": dps.model_calls}
    target = dps.teacher_final
    path, objective = dps.result.paths[K], dps.result.costs[K]
    if mode == "student":
        path, objective = sh.st.paths[K], sh.st.costs[K]
    if mode == "refined":
        dp_paths = {"dp-teacher": dps.result.paths[K]} | ({"dp-student": sh.st.paths[K]} if sh.st is not None else {})
        starts = refinement_starts(adapter, nfe, solver, g, dp_paths, free_start)
        score, oprov = make_scorer(objective_name, target, model_name=adapter.name, features=features)
        allowance = None
        if max_cost is not None:  # in model evaluations per search sample (module docstring)
            ref_ps = reference_evals_per_sample(dps, noise.shape[0], micro_batch)
            allowance = int(max_cost * ref_ps - ref_ps - (sh.calls - dps.model_calls))
        errs, rolled = {}, {}
        if rec["errs"] is None:
            for name, p in starts.items():  # one rollout each; the chosen one's states seed the refinement
                x, states = rollout(adapter, solver, [g[i] for i in p], x=noise, keep=True)
                errs[name], rolled[name] = score(x), states
            rec["errs"] = dict(errs)
            mark()
            ck.save()
        else:
            errs = {k: float(v) for k, v in rec["errs"].items()}
            if set(errs) != set(starts):
                raise StepsmithError(f"checkpoint {ck.path} holds other refinement starts than this search's; "
                                     "delete it to start over", param="checkpoint")
        ranked = sorted(errs, key=errs.get)
        refined = ranked[:1]
        if second_start is True or (second_start == "auto" and K < PATTERN_BELOW_STEPS):
            # the best start at another start level: coordinate moves rarely carry the first node across basins
            refined += [k for k in ranked if starts[k][0] != starts[ranked[0]][0]
                        and errs[k] <= SECOND_START_WITHIN * errs[ranked[0]]][:1]
        results, stats = {}, {}
        for name in refined:  # the best result of the refined starts wins
            if name in rec["results"]:  # refined by the run this one resumes
                p, e, sw = rec["results"][name]
                results[name] = (list(p), float(e), int(sw))
                if rec["out_of_calls"]:
                    stats["out_of_calls"] = True
                    break
                continue
            node = rec["node"].get(name)
            if node is not None:  # the run this one resumes stopped inside this refinement
                first, first_err, first_states = list(node["path"]), float(node["best"]), rebuild(node["path"])
            else:
                first, first_err = starts[name], errs[name]
                first_states = rolled[name] if name in rolled else rebuild(first)

            def on_node(state: dict, name=name) -> None:
                rec["node"][name] = state
                mark()
                ck.save()

            ceiling = None if allowance is None else \
                getattr(adapter, "calls", 0) + allowance - (total() - prior_rebuild - rebuilt)
            results[name] = refine_final_error(adapter, solver, g, first, noise, target,
                                               candidates=candidates, max_sweeps=max_sweeps, free_start=free_start,
                                               progress=progress, score=score, moves=moves,
                                               start=(first_err, first_states), max_calls=ceiling, stats=stats,
                                               resume=node, on_node=on_node if ck.path is not None else None)
            rec["results"][name] = list(results[name])
            rec["node"].pop(name, None)
            rec["out_of_calls"] = bool(stats.get("out_of_calls"))
            mark()
            ck.save()
            if stats.get("out_of_calls"):
                break
        start = min(results, key=lambda k: results[k][1])
        path, objective_value, sweeps = results[start]
        prov.update(start=start, free_start=free_start, moves=moves, student_start=sh.st is not None,
                    student_corridor=sh.corridor, corridor_rounds=getattr(sh.st, "rounds", None),
                    start_final_errors={k: float(v) for k, v in errs.items()},
                    start_first_nodes={k: p[0] for k, p in starts.items()},
                    sweeps=sweeps, max_cost=max_cost, out_of_calls=bool(stats.get("out_of_calls")),
                    refined_starts={k: float(v[1]) for k, v in results.items()},
                    objective_kind=objective_kind(objective_name, oprov["features"], dps.teacher.name),
                    **oprov)
        if objective_name != "teacher-mse":
            prov["teacher_mse"] = final_error(adapter, solver, [g[i] for i in path], noise, target)
        objective = objective_value
    else:
        prov["objective_kind"] = f"dp path cost (mean squared one-step error vs {dps.teacher.name})" \
            if mode == "teacher" else final_mse_kind(dps.teacher)
    prov["search_seconds"] = round(sh.seconds + time.perf_counter() - t0, 3)
    prov["path"] = path
    mark()
    return TimestepTable.from_sigmas([g[i] for i in path], convention=adapter.convention,
                                     prediction=adapter.prediction, solver=solver, method="dp", model=adapter.name,
                                     objective=objective, provenance=prov)


def reference_evals_per_sample(dps, samples: int, micro_batch: int) -> float:
    """Model evaluations the reference pass spent per search sample (its calls ran per micro-batch, on every rank)."""
    return dps.model_calls / len(micro_batches(samples, micro_batch))


def _check_options(mode: str, late_weight: float | None, variant: str | None,
                   objective: str | None = DEFAULT_OBJECTIVE, max_cost: float | None = None) -> None:
    if max_cost is not None and (isinstance(max_cost, bool) or not isinstance(max_cost, (int, float))
                                 or not max_cost >= 1):
        raise StepsmithError(f"`max_cost` is the search's budget in reference passes (a number ≥ 1, e.g. 2.5), "
                             f"got {max_cost!r}", param="max_cost")
    if max_cost is not None and (variant is not None or mode != "refined"):
        raise StepsmithError("`max_cost` bounds the refinement: it needs mode=refined and no published `variant`",
                             param="max_cost")
    if variant is not None and variant not in VARIANTS:
        raise StepsmithError(f"unknown dp `variant` {variant!r}; use one of {', '.join(VARIANTS)}", param="variant")
    if mode not in MODES:
        raise StepsmithError(f"unknown dp `mode` {mode!r}; use one of {', '.join(MODES)}", param="mode")
    if late_weight is not None and not late_weight > 0:
        raise StepsmithError(f"`late_weight` must be positive, got {late_weight}", param="late_weight")
    if objective not in (None, DEFAULT_OBJECTIVE) and (variant is not None or mode != "refined"):
        raise StepsmithError(f"`objective` {objective} is what the refinement minimises: it needs mode=refined "
                             "and no published `variant`", param="objective")


def dp_tables(adapter, nfes: list[int], solver: str = "euler", *, samples: int = 64, seed: int = 0,
              progress: bool = False, mode: str = "refined", grid: int | None = None, grid_kind: str = "auto",
              micro_batch: int = 16, late_weight: float | None = None, substeps: int = 1, candidates: int = 6,
              max_sweeps: int = 2, free_start: bool = True, variant: str | None = None,
              reduce: str | None = None, objective: str = DEFAULT_OBJECTIVE,
              features=None, moves: str = "auto", student_start: bool = True,
              student_corridor: int | None = STUDENT_CORRIDOR,
              max_cost: float | None = None,
              second_start: bool | str = "auto", checkpoint: str | None = None) -> dict[int, TimestepTable]:
    """The ``dp`` tables of every budget in ``nfes`` from ONE reference pass and ONE Bellman pass.

    Only the refinement runs per budget. With several budgets each table's ``model_calls`` are its
    own (refinement) calls and ``shared_pass`` records the shared pass once, flagged ``shared``.
    ``objective`` (:mod:`schedules.search.objectives`) is what the refinement minimises; ``features``
    (an embedded feature network's name or a callable) is the feature space of the feature objectives;
    ``auto`` is feature-mse for a model with a feature network, else teacher-mse (:func:`resolve_objective`).
    ``moves`` is the refinement's node search (``auto``: :func:`auto_moves`; or one of
    :data:`~schedules.search.dp.REFINE_MOVES`), ``student_start`` whether the student DP runs to seed it
    (module docstring: the measured trade-off), ``student_corridor`` the half-width in grid nodes of its
    re-centred corridor around the teacher-DP paths (None or 0: the full student DP, ≈ K·n model calls).
    ``max_cost`` (None: unbounded) caps each budget's search at that many reference passes, counted in model
    evaluations per search sample: the refinement stops at the budget with its best path so far (module docstring).
    ``second_start`` (``auto``: below 8 steps; True; False) also refines the best start at another start level
    when it is nearly as good, and keeps the better result (module docstring).
    ``checkpoint`` (a file path; None: none) saves the search as it goes and resumes it from there
    (module docstring).
    """
    from schedules.search.objectives import feature_name

    _check_options(mode, late_weight, variant, objective, max_cost)
    if moves != "auto" and moves not in REFINE_MOVES:
        raise StepsmithError(f"unknown refinement `moves` {moves!r}; use auto or one of {', '.join(REFINE_MOVES)}",
                             param="moves")
    objective = resolve_objective(objective, adapter.name, features) if variant is None and mode == "refined" \
        else "teacher-mse"
    fname = feature_name(objective, adapter.name, features)  # refuse before any model call
    nfes = list(dict.fromkeys(int(v) for v in nfes))
    if variant is not None:
        if checkpoint is not None:
            raise StepsmithError(f"`checkpoint` resumes stepsmith's own dp search; the published variant {variant} "
                                 "is one pass and is not resumable: leave `checkpoint` out", param="checkpoint")
        return variant_tables(adapter, nfes, solver, VARIANTS[variant], samples=samples, seed=seed, grid=grid,
                              late_weight=late_weight, micro_batch=micro_batch, reduce=reduce,
                              grid_kind=None if grid_kind == "auto" else grid_kind)
    if reduce is not None:
        raise StepsmithError("`reduce` is an option of the per-sample dp variant (variant=oss)", param="reduce")
    if student_corridor is not None and (isinstance(student_corridor, bool) or not isinstance(student_corridor, int)
                                         or student_corridor < 0):
        raise StepsmithError(f"`student_corridor` must be a half-width in grid nodes (an integer ≥ 0; 0 or None: "
                             f"the full student DP), got {student_corridor!r}", param="student_corridor")
    if not (second_start == "auto" or isinstance(second_start, bool)):
        raise StepsmithError(f"`second_start` is auto, true or false, got {second_start!r}", param="second_start")
    w = 1.0 if late_weight is None else float(late_weight)
    Ks = {nfe: steps_for(adapter, nfe, solver) for nfe in nfes}
    opts = dict(samples=samples, seed=seed, mode=mode, grid=grid, grid_kind=grid_kind, micro_batch=micro_batch,
                late_weight=w, substeps=substeps, candidates=candidates, max_sweeps=max_sweeps, free_start=free_start,
                objective=objective, features=fname, moves=moves,
                student_start=student_start, student_corridor=student_corridor, max_cost=max_cost,
                second_start=second_start)
    if objective.startswith("data-"):  # a data objective's errors hold for that data only
        opts["data"] = data_key(adapter.name)
    ck = open_checkpoint(checkpoint, "dp", checkpoint_key(adapter, method="dp", nfe=nfes, solver=solver, **opts),
                         adapter)
    tables = ck.state.setdefault("tables", {})
    if ck.state.get("shared") is not None:
        sh = _shared_from_state(adapter, ck.state["shared"], samples=samples, seed=seed, substeps=substeps)
    else:
        sh = _shared_pass(adapter, sorted(set(Ks.values())), solver, samples=samples, seed=seed, progress=progress,
                          mode=mode, grid=grid, grid_kind=grid_kind, micro_batch=micro_batch, late_weight=w,
                          substeps=substeps, student_start=student_start, student_corridor=student_corridor)
        ck.state["shared"] = _shared_state(sh)
        ck.save()
    out = {}
    for nfe, K in Ks.items():
        if nfe in tables:  # finished by the run this one resumes
            out[nfe] = TimestepTable.from_dict(tables[nfe])
            if len(nfes) == 1:  # the search's cost, not this run's (which loaded it)
                out[nfe].provenance.update(ck.spent())
            continue
        out[nfe] = _finish(adapter, nfe, K, solver, sh, mode=mode, grid_kind=grid_kind, micro_batch=micro_batch,
                           late_weight=w, candidates=candidates, max_sweeps=max_sweeps, free_start=free_start,
                           progress=progress, objective_name=objective, features=features, moves=moves,
                           max_cost=max_cost, second_start=second_start, ck=ck)
        prov = out[nfe].provenance
        if len(nfes) > 1:
            prov.update(model_calls=_budget_state(ck, nfe)["calls"], shared_pass={
                "shared": True, "nfe": nfes, "model_calls": sh.calls, "seconds": round(sh.seconds, 3),
                "note": "one reference and Bellman pass for every budget; model_calls excludes it"})
        if ck.path is not None:
            prov["checkpoint"] = str(ck.path)
        if ck.resumed:  # the whole search's cost, this run and the runs it resumed (make_table keeps these)
            prov["resumed"] = dict(ck.earlier)
            if len(nfes) == 1:
                prov.update(ck.spent())
        tables[nfe] = out[nfe].to_dict()
        ck.save()
    return out


def _budget_state(ck: SearchCheckpoint, nfe: int) -> dict:
    """Budget ``nfe``'s refinement progress in ``ck`` (created empty): start errors, refined starts, the node
    search being run, calls spent (``rebuild``: of them, rebuilding node states after a resume)."""
    return ck.state.setdefault("finish", {}).setdefault(nfe, {"errs": None, "results": {}, "node": {}, "calls": 0,
                                                              "rebuild": 0, "out_of_calls": False})


def _shared_state(sh: _Shared) -> dict:
    """What a checkpoint keeps of the shared pass: every answer the budgets' tables read, not the cost
    matrices or teacher states (nothing after the pass reads them)."""
    dps, st = sh.dps, sh.st
    return {"grid": list(sh.g), "teacher_paths": dps.result.paths, "teacher_costs": dps.result.costs,
            "teacher_final": dps.teacher_final, "ref_seconds": dps.ref_seconds, "dp_seconds": dps.dp_seconds,
            "reference_calls": dps.model_calls, "world": dps.extra["world"], "seconds": sh.seconds, "calls": sh.calls,
            "corridor": sh.corridor, "student": None if st is None else
            {"paths": st.paths, "costs": st.costs, "rounds": getattr(st, "rounds", None)}}


def _shared_from_state(adapter, d: dict, *, samples: int, seed: int, substeps: int) -> _Shared:
    """The shared pass of a resumed search, from :func:`_shared_state` (the noise is drawn again from its seed)."""
    g = [float(v) for v in d["grid"]]
    dps = DPSearch(g, BellmanResult(d["teacher_paths"], d["teacher_costs"]), adapter.noise(samples, seed),
                   d["teacher_final"], d["ref_seconds"], d["dp_seconds"], d["reference_calls"],
                   {"cost": None, "states": None, "world": d["world"]}, search_teacher(g, substeps))
    s = d["student"]
    st = None if s is None else (BellmanResult(s["paths"], s["costs"]) if s["rounds"] is None
                                 else CorridorResult(s["paths"], s["costs"], s["rounds"]))
    return _Shared(g, dps.noise, dps, st, d["seconds"], d["calls"], d["corridor"])


def dp_table(adapter, nfe: int, solver: str = "euler", *, samples: int = 64, seed: int = 0, progress: bool = False,
             mode: str = "refined", grid: int | None = None, grid_kind: str = "auto", micro_batch: int = 16,
             late_weight: float | None = None, substeps: int = 1, candidates: int = 6, max_sweeps: int = 2,
             free_start: bool = True, variant: str | None = None, reduce: str | None = None,
             objective: str = DEFAULT_OBJECTIVE, features=None, moves: str = "auto",
             student_start: bool = True, student_corridor: int | None = STUDENT_CORRIDOR,
             max_cost: float | None = None,
             second_start: bool | str = "auto", checkpoint: str | None = None) -> TimestepTable:
    """The ``dp`` table of ``mode`` (or of a published ``variant``) for ``nfe`` evaluations (module docstring)."""
    return dp_tables(adapter, [nfe], solver, samples=samples, seed=seed, progress=progress, mode=mode, grid=grid,
                     grid_kind=grid_kind, micro_batch=micro_batch, late_weight=late_weight, substeps=substeps,
                     candidates=candidates, max_sweeps=max_sweeps, free_start=free_start, variant=variant,
                     reduce=reduce, objective=objective, features=features, moves=moves,
                     student_start=student_start, student_corridor=student_corridor, max_cost=max_cost,
                     second_start=second_start, checkpoint=checkpoint)[nfe]
