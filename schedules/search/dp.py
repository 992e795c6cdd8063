"""Dynamic-programming optimal steps (BOSS / GITS / OSS / Watson et al.), with a final-error refinement.

* **Teacher-state cost** (BOSS, Nguyen et al. 2024; GITS, Chen et al. 2024): reference
  trajectories on a fine grid; c[i][j] = mean squared error of one step of the *chosen solver*
  from the teacher state at node i to node j against the teacher state at j. The cost matrix is
  streamed over micro-batches of samples (memory grows with the micro-batch, never with
  n × B × D) and summed; with several processes every rank takes every world-th micro-batch
  and the matrices are sum-reduced.
* **Bellman recursion for all budgets at once** (Watson et al. 2021): V[k][i] = min_j c[i][j] +
  V[k-1][j] with an argmin table, so every K ≤ Kmax is read off one pass; no float-equality
  backtracking.
* **DPM-Solver++(2M)** needs the previous x0 estimate: the DP state is augmented with the
  previous node, c3[p][i][j], solved exactly in O(Kmax·n³).
* **Heun** budgets are in NFE (2K-1): the cost of i → j makes the second evaluation at j.
* **Late-step weight** (GITS ``coeff``): the cost of a step with k steps remaining (itself
  included) is multiplied by w^-(k-1), i.e. later steps weigh w times more than their
  predecessor — budget-independent, so all budgets still come out of one pass.
* **Student-state DP** (OSS, Wang et al. 2025): forward DP whose level-k states are the
  *student's* states on the best k-step path (the model is re-evaluated there); the cost at the
  terminal node is the true final-sample error of the path. The **corridor** variant keeps level k
  to a band of nodes around the k-th node of seed paths and re-centres the band on its answer
  (iterative dynamic programming, Luus 1990): ≈ K·(2W+1) model calls a round instead of ≈ K·n.
* **Final-error refinement** (stepsmith): a plain local teacher-state DP loses to diffusers'
  defaults on final-sample error, because local errors are not how errors
  propagate. Starting from a DP table, coordinate descent moves each interior node to a grid
  node between its neighbours that lowers the final error against the teacher on the search
  samples, until no move helps: evenly spread candidates, or a pattern search (±δ, δ halving)
  that needs fewer rollouts; an accepted trial's node states are reused, so a move costs no
  re-rollout. This is the default of ``make_table(method="dp")``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from schedules.conditioning import bind, micro_batches
from schedules.distributed import Dist, current_dist
from schedules.io import StepsmithError
from schedules.search.common import (
    Reference,
    RollState,
    check_finite,
    first_order_coeffs,
    half_lambda,
    mse,
    one_step,
    reference_pass,
    rollout,
    search_teacher,
    validate_budget,
)
from schedules.solvers import euler_step, get_solver, heun_correct, heun_predict
from schedules.teacher import Teacher, teacher_sample

# --------------------------------------------------------------------------- cost matrices


COST_METRICS = ("mse", "l2")


@torch.no_grad()
def _costs_first_order(conv, grid, ref, metric: str = "mse") -> torch.Tensor:
    """Sum over the micro-batch of per-sample errors of one first-order step, c[i][j] (j > i).

    ``metric`` "mse": a sample's mean squared error (BOSS); "l2": its Euclidean norm (GITS' ``l2``).
    """
    n = len(grid) - 1
    b = ref.x.shape[1]
    numel = ref.x[0].numel()
    C = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    xf = ref.x.reshape(n + 1, -1).to(torch.float64)
    df = ref.d.reshape(n, -1).to(torch.float64)
    g = torch.tensor(grid, dtype=torch.float64)
    for i in range(n):
        A, B = first_order_coeffs(conv, grid[i], g[i + 1:])
        pred = A[:, None] * xf[i][None] + B[:, None] * df[i][None]
        if metric == "l2":
            C[i, i + 1:] = (pred - xf[i + 1:]).reshape(n - i, b, -1).norm(dim=2).sum(1)
        else:
            C[i, i + 1:] = ((pred - xf[i + 1:]) ** 2).sum(1) / (numel / b)
    return C


@torch.no_grad()
def heun_jumps(denoiser, x: torch.Tensor, x0: torch.Tensor, s: float, targets: list[float],
               dtype: torch.dtype) -> torch.Tensor:
    """One Heun step from (x, D = x0) at ``s`` to every sigma of ``targets`` → [len(targets), B, ...] (float64).

    The predictor and corrector of :func:`~schedules.solvers.heun_step`, with the corrections' model
    calls batched over the targets (one call, inputs in ``dtype``); a terminal target σ = 0 gets the
    Euler step, as in the solver.
    """
    conv = denoiser.convention
    inner = [t for t in targets if t > 0]
    out = []
    if inner:
        y = x / float(conv.ode_scale(torch.tensor(s, dtype=torch.float64)))
        d = (y - x0) / s
        sj = torch.tensor(inner, dtype=torch.float64).view(-1, *([1] * x.ndim))
        cj = conv.ode_scale(sj)
        y_pred = heun_predict(y, d, s, sj)  # [nj, B, ...]
        s_in = torch.tensor(inner, dtype=dtype).repeat_interleave(x.shape[0])
        with bind(torch.arange(x.shape[0]).repeat(len(inner))):  # target-major: the B samples once per target
            x0_pred = denoiser.denoise((y_pred * cj).reshape(-1, *x.shape[1:]).to(dtype), s_in)
        check_finite(x0_pred, "a Heun correction")
        out.append(heun_correct(y, d, y_pred, x0_pred.reshape(y_pred.shape).to(torch.float64), s, sj) * cj)
    if len(inner) < len(targets):
        out.append(euler_step(conv, x, x0, s, 0.0)[None])
    return torch.cat(out)


@torch.no_grad()
def _costs_heun(denoiser, grid, ref) -> torch.Tensor:
    """Heun i → j from the teacher state at i (:func:`heun_jumps`: one batched model call per i)."""
    n = len(grid) - 1
    numel_per = ref.x[0].numel() / ref.x.shape[1]
    C = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for i in range(n):
        pred = heun_jumps(denoiser, ref.x[i].to(torch.float64), ref.d[i].to(torch.float64), grid[i], grid[i + 1:],
                          ref.x.dtype)
        C[i, i + 1:] = ((pred - ref.x[i + 1:].to(torch.float64)) ** 2).reshape(n - i, -1).sum(1) / numel_per
    return C


@torch.no_grad()
def _costs_dpmpp(conv, grid, ref) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM++(2M): c2[i][j] (first step, no history) and c3[p][i][j] (previous node p).

    pred = P1_j + g_pj·(D_i - D_p) with P1 the first-order prediction, so the squared error
    expands into matmuls: |E_j|² + 2 g <E_j, Δ_p> + g² |Δ_p|².
    """
    n = len(grid) - 1
    b = ref.x.shape[1]
    numel_per = ref.x[0].numel() / b
    xf = ref.x.reshape(n + 1, -1).to(torch.float64)
    df = ref.d.reshape(n, -1).to(torch.float64)
    g = torch.tensor(grid, dtype=torch.float64)
    lam = torch.full((n + 1,), math.inf, dtype=torch.float64)
    lam[:n] = half_lambda(conv, g[:n])
    C2 = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    C3 = torch.zeros(n + 1, n + 1, n + 1, dtype=torch.float64)
    for i in range(n):
        A, B = first_order_coeffs(conv, grid[i], g[i + 1:])
        E = A[:, None] * xf[i][None] + B[:, None] * df[i][None] - xf[i + 1:]  # [nj, F]
        e2 = (E**2).sum(1)
        C2[i, i + 1:] = e2 / numel_per
        if i == 0:
            continue
        delta = df[i][None] - df[:i]  # [np, F]
        h_pi = lam[i] - lam[:i]  # [np]
        h_ij = lam[i + 1:] - lam[i]  # [nj]
        ok_p = torch.isfinite(h_pi) & (h_pi > 0)
        ok_j = torch.isfinite(h_ij)
        coef = torch.where(ok_j[None, :] & ok_p[:, None],
                           B[None, :] * h_ij[None, :] / (2 * h_pi[:, None]), torch.zeros(()))  # [np, nj]
        coef = torch.nan_to_num(coef, nan=0.0, posinf=0.0, neginf=0.0)
        cross = delta @ E.T  # [np, nj]
        d2 = (delta**2).sum(1)  # [np]
        C3[:i, i, i + 1:] = (e2[None, :] + 2 * coef * cross + coef**2 * d2[:, None]) / numel_per
    return C2, C3


# --------------------------------------------------------------------------- Bellman


@dataclass
class BellmanResult:
    """All-budget DP answers: ``paths[K]`` (grid indices incl. start 0 and terminal n), ``costs[K]``."""

    paths: dict[int, list[int]]
    costs: dict[int, float]


def _weights(kmax: int, late_weight: float) -> list[float]:
    return [late_weight ** (-(k - 1)) for k in range(kmax + 1)]


def bellman_all(C: torch.Tensor, kmax: int, late_weight: float = 1.0, start: int = 0) -> BellmanResult:
    """Exact shortest paths from ``start`` to the last node with exactly K edges, for every K ≤ kmax.

    ``C[i][j]`` (j > i) is the cost of the edge i → j; other entries are ignored.
    """
    n = C.shape[0] - 1
    validate_budget(kmax, n - start)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    mask = torch.triu(torch.ones(n + 1, n + 1, dtype=torch.bool), diagonal=1)
    Cm = torch.where(mask, C.to(torch.float64), inf)
    w = _weights(kmax, late_weight)
    V = torch.full((kmax + 1, n + 1), math.inf, dtype=torch.float64)
    arg = torch.full((kmax + 1, n + 1), -1, dtype=torch.long)
    V[0, n] = 0.0
    for k in range(1, kmax + 1):
        tot = w[k] * Cm + V[k - 1][None, :]
        V[k], arg[k] = tot.min(1)
    paths, costs = {}, {}
    for K in range(1, kmax + 1):
        if not math.isfinite(float(V[K, start])):
            continue
        p = [start]
        for k in range(K, 0, -1):
            p.append(int(arg[k, p[-1]]))
        paths[K], costs[K] = p, float(V[K, start])
    return BellmanResult(paths, costs)


def bellman_all_augmented(C2: torch.Tensor, C3: torch.Tensor, kmax: int, late_weight: float = 1.0) -> BellmanResult:
    """Shortest K-edge paths from node 0 when an edge's cost depends on the previous node (DPM++(2M)).

    State (p, i): at node i having come from p. V[k][p][i] = min_j C3[p,i,j] + V[k-1][i][j];
    the first edge uses C2[0][j] (no history).
    """
    n = C2.shape[0] - 1
    validate_budget(kmax, n)
    inf = math.inf
    w = _weights(kmax, late_weight)
    idx = torch.arange(n + 1)
    valid3 = (idx[:, None, None] < idx[None, :, None]) & (idx[None, :, None] < idx[None, None, :])
    C3m = torch.where(valid3, C3.to(torch.float64), torch.tensor(inf, dtype=torch.float64))
    V = [torch.full((n + 1, n + 1), inf, dtype=torch.float64)]
    V[0][:, n] = 0.0  # at the terminal (from any p) nothing remains
    arg = [None]
    for k in range(1, kmax + 1):
        # tot[p,i,j] = w·C3[p,i,j] + V[k-1][i][j]
        tot = w[k] * C3m + V[k - 1][None, :, :]
        v, a = tot.min(2)
        V.append(v)
        arg.append(a)
    paths, costs = {}, {}
    mask = idx > 0
    for K in range(1, kmax + 1):
        if K == 1:
            first = w[1] * C2[0].clone()
            first[~(idx == n)] = inf
        else:
            first = w[K] * C2[0].to(torch.float64) + V[K - 1][0]
        first = torch.where(mask, first, torch.tensor(inf, dtype=torch.float64))
        j = int(first.argmin())
        if not math.isfinite(float(first[j])):
            continue
        p = [0, j]
        for k in range(K - 1, 0, -1):
            p.append(int(arg[k][p[-2], p[-1]]))
        paths[K], costs[K] = p, float(first[j])
    return BellmanResult(paths, costs)


# --------------------------------------------------------------------------- teacher-state search


@dataclass
class DPSearch:
    """Everything the DP pass produced (kept so the caller can refine and report)."""

    grid: list[float]
    result: BellmanResult
    noise: torch.Tensor
    teacher_final: torch.Tensor
    ref_seconds: float
    dp_seconds: float
    model_calls: int
    extra: dict = field(default_factory=dict)
    teacher: Teacher | None = None


@dataclass
class _CostSums:
    """Cost matrices, teacher finals and (optionally) teacher states summed over this rank's micro-batches."""

    C: torch.Tensor
    C3: torch.Tensor | None
    finals: torch.Tensor
    states: torch.Tensor | None

    @classmethod
    def zeros(cls, n: int, noise: torch.Tensor, solver: str, keep_states: bool) -> _CostSums:
        return cls(torch.zeros(n + 1, n + 1, dtype=torch.float64),
                   torch.zeros(n + 1, n + 1, n + 1, dtype=torch.float64) if solver == "dpmpp-2m" else None,
                   torch.zeros_like(noise),
                   torch.zeros((n + 1, *noise.shape), dtype=noise.dtype) if keep_states else None)

    def add(self, denoiser, grid: list[float], solver: str, ref, sl: slice, metric: str = "mse") -> None:
        self.finals[sl] = ref.x[-1]
        if self.states is not None:
            self.states[:, sl] = ref.x
        if solver == "heun":
            self.C += _costs_heun(denoiser, grid, ref)
        elif solver == "dpmpp-2m":
            c2, c3 = _costs_dpmpp(denoiser.convention, grid, ref)
            self.C += c2
            self.C3 += c3
        else:
            self.C += _costs_first_order(denoiser.convention, grid, ref, metric)

    def reduced(self, dist: Dist, count: int) -> _CostSums:
        """Summed over ranks; the cost matrices become means over the ``count`` samples."""
        return _CostSums(dist.sum_tensor(self.C) / count,
                         None if self.C3 is None else dist.sum_tensor(self.C3) / count,
                         dist.sum_tensor(self.finals),
                         None if self.states is None else dist.sum_tensor(self.states))


@torch.no_grad()
def teacher_dp(denoiser, noise: torch.Tensor, grid: list[float], solver: str, kmax: int, *,
               micro_batch: int = 16, late_weight: float = 1.0, substeps: int = 1,
               progress: bool = False, keep_states: bool = False, teacher: Teacher | None = None,
               metric: str = "mse") -> DPSearch:
    """BOSS/GITS teacher-state DP for every budget ≤ kmax, streaming costs over micro-batches.

    Memory grows with the micro-batch (n·b·D for one micro-batch's trajectories), not with the
    number of samples. ``keep_states`` additionally returns all teacher states (n·B·D, for the
    student-state DP, which needs them anyway) in ``extra["states"]``. The teacher is
    :func:`~schedules.search.common.search_teacher` (Heun on the grid, ``substeps`` per interval) unless
    ``teacher`` (whose grid must hold the search grid's nodes) is given; ``metric`` applies to first-order
    costs (:func:`_costs_first_order`).
    """
    get_solver(solver)
    n = len(grid) - 1
    validate_budget(kmax, n)
    dist = current_dist()
    calls0 = getattr(denoiser, "calls", 0)
    sums = _CostSums.zeros(n, noise, solver, keep_states)
    t_ref = t_dp = 0.0
    chunks = micro_batches(noise.shape[0], micro_batch)
    for ci in tqdm(range(len(chunks)), desc=f"dp ({solver})", disable=not progress or not dist.main, leave=False):
        if ci % dist.world != dist.rank:
            continue
        sl = chunks[ci]
        t0 = time.perf_counter()
        with bind(sl):  # conditional models: the micro-batch keeps its samples' conditions
            ref = reference_pass(denoiser, noise[sl], grid, substeps) if teacher is None else \
                teacher_reference(denoiser, noise[sl], grid, teacher)
            t1 = time.perf_counter()
            sums.add(denoiser, grid, solver, ref, sl, metric)
        t_dp += time.perf_counter() - t1
        t_ref += t1 - t0
    tot = sums.reduced(dist, noise.shape[0])
    calls = int(dist.sum_tensor(torch.tensor(float(getattr(denoiser, "calls", 0) - calls0))).item())
    check_finite(tot.C, "the cost matrix")
    t2 = time.perf_counter()
    if solver == "dpmpp-2m":
        res = bellman_all_augmented(tot.C, tot.C3, kmax, late_weight)
    else:
        res = bellman_all(tot.C, kmax, late_weight)
    t_dp += time.perf_counter() - t2
    return DPSearch(grid, res, noise, tot.finals, t_ref, t_dp, calls,
                    {"cost": tot.C, "states": tot.states, "world": dist.world},
                    search_teacher(grid, substeps) if teacher is None else teacher)


@torch.no_grad()
def teacher_reference(denoiser, noise: torch.Tensor, grid: list[float], teacher: Teacher) -> Reference:
    """States and denoised values of any ``teacher`` at the grid's nodes (the grid must lie on its grid)."""
    run = teacher_sample(denoiser, noise, teacher, nodes=grid)
    check_finite(run.states, "the reference trajectory")
    return Reference(run.states, run.denoised[:-1])


# --------------------------------------------------------------------------- student-state DP (OSS)


@torch.no_grad()
def jump_all(denoiser, solver: str, st: RollState, s_i: float, s_js: list[float]) -> torch.Tensor:
    """One solver step from the state ``st`` at ``s_i`` to every sigma in ``s_js`` → [len(s_js), B, ...]."""
    conv = denoiser.convention
    if solver == "heun":
        return torch.stack([one_step(denoiser, solver, st, s_i, sj) for sj in s_js])
    sj = torch.tensor(s_js, dtype=torch.float64)
    A, B = first_order_coeffs(conv, s_i, sj)
    view = (-1,) + (1,) * st.x.ndim
    x, d = st.x.to(torch.float64), st.x0.to(torch.float64)
    pred = A.view(view) * x[None] + B.view(view) * d[None]
    if solver == "dpmpp-2m" and st.x0_prev is not None:
        lam_i = half_lambda(conv, torch.tensor(s_i, dtype=torch.float64))
        h_last = lam_i - half_lambda(conv, torch.tensor(st.s_prev, dtype=torch.float64))
        if torch.isfinite(h_last) and h_last > 0:
            pos = sj > 0
            h = torch.zeros_like(sj)
            h[pos] = half_lambda(conv, sj[pos]) - lam_i
            g = torch.where(pos, B * h / (2 * h_last), torch.zeros(()))
            pred = pred + g.view(view) * (d - st.x0_prev.to(torch.float64))[None]
    return pred.to(st.x.dtype)


@dataclass
class _Level:
    """Best k-step student paths: per reached node j its error, state (j < n), predecessor, and that node's D and σ."""

    err: dict[int, float] = field(default_factory=dict)
    x: dict[int, torch.Tensor] = field(default_factory=dict)
    back: dict[int, int] = field(default_factory=dict)
    x0_prev: dict[int, torch.Tensor | None] = field(default_factory=dict)
    s_prev: dict[int, float | None] = field(default_factory=dict)


def corridor_bands(n: int, paths: list[list[int]], width: int) -> dict[int, set[int]]:
    """The nodes each level of a corridor student DP may reach: level k → the grid nodes within ``width``
    of the k-th node of any seed path (0 → n, one per budget K = len(path) − 1), clipped to the nodes from
    which that path's budget can still finish (k ≤ j ≤ n − (K − k)); the terminal n belongs to level K."""
    if width < 0:
        raise StepsmithError(f"`student_corridor` must be a non-negative width in grid nodes, got {width}",
                             param="student_corridor")
    bands: dict[int, set[int]] = {}
    for p in paths:
        K = len(p) - 1
        if p[0] != 0 or p[-1] != n or any(a >= b for a, b in zip(p, p[1:])):
            raise StepsmithError(f"a corridor seed must be a strictly increasing path 0 → {n}, got {p}",
                                 param="student_corridor")
        for k in range(1, K):
            bands.setdefault(k, set()).update(range(max(k, p[k] - width), min(n - (K - k), p[k] + width) + 1))
        bands.setdefault(K, set()).add(n)
    return bands


def _extend(denoiser, solver: str, grid: list[float], lvl: _Level, errs, allowed: set[int] | None = None) -> _Level:
    """Level k+1 from level k: evaluate the model at every level-k state and jump to every later node
    (only to the nodes of ``allowed``, when given; a state with no allowed later node costs no model call)."""
    n = len(grid) - 1
    new = _Level()
    for i in sorted(lvl.x):
        js = [j for j in range(i + 1, n + 1) if allowed is None or j in allowed]
        if not js:
            continue
        xi = lvl.x[i]
        di = denoiser.denoise(xi, torch.full((xi.shape[0],), grid[i], dtype=xi.dtype))
        check_finite(di, "a student state")
        pred = jump_all(denoiser, solver, RollState(xi, di, lvl.x0_prev[i], lvl.s_prev[i]), grid[i],
                        [grid[j] for j in js])
        e = errs(pred, js)
        for q, j in enumerate(js):
            v = float(e[q])
            if j not in new.err or v < new.err[j]:
                new.err[j], new.back[j], new.x0_prev[j], new.s_prev[j] = v, i, di, grid[i]
                if j < n:
                    new.x[j] = pred[q]
    return new


@torch.no_grad()
def student_dp(denoiser, noise: torch.Tensor, grid: list[float], solver: str, kmax: int,
               teacher_states: torch.Tensor, *, progress: bool = False,
               bands: dict[int, set[int]] | None = None) -> BellmanResult:
    """OSS-style forward DP over student states (Wang et al. 2025, "Optimal Stepsize for Diffusion Sampling").

    Level k keeps, for every node j, the best k-step path from node 0 to j judged by the error of the
    *student's* state at j against the teacher's (``teacher_states[j]``, [n+1, B, ...]); level-k states
    are re-evaluated by the model to extend them. The cost at the terminal node is the true final error.
    Memory: two levels of student states (2·n·B·D) — the argmin couples samples, so no micro-batching.

    ``bands`` (:func:`corridor_bands`) makes it a corridor DP: level k reaches only the nodes of
    ``bands[k]``, so the model is evaluated ≈ Σ_k |bands[k]| times instead of ≈ K·n; its K-step answer
    is the full DP's whenever the bands hold every node a K-step path can use, and only the budgets whose
    level holds the terminal node get a path.
    """
    n = len(grid) - 1
    validate_budget(kmax, n)
    if bands is not None:
        kmax = min(kmax, max(k for k, b in bands.items() if n in b))
    T = teacher_states.to(torch.float64)
    red = tuple(range(1, T.ndim))

    def errs(pred: torch.Tensor, js: list[int]) -> torch.Tensor:
        return ((pred.to(torch.float64) - T[js]) ** 2).mean(dim=red)

    def allowed(k: int) -> set[int] | None:
        return None if bands is None else bands.get(k, set())

    lvl = _extend(denoiser, solver, grid, _Level(x={0: noise}, x0_prev={0: None}, s_prev={0: None}), errs, allowed(1))
    back: list[dict[int, int]] = [{}, lvl.back]
    paths, costs = ({1: [0, n]}, {1: lvl.err[n]}) if n in lvl.err else ({}, {})
    for k in tqdm(range(2, kmax + 1), desc="student dp", disable=not progress, leave=False):
        lvl = _extend(denoiser, solver, grid, lvl, errs, allowed(k))
        back.append(lvl.back)
        if n in lvl.err:
            p = [n]
            for kk in range(k, 0, -1):
                p.append(back[kk][p[-1]])
            paths[k], costs[k] = p[::-1], lvl.err[n]
    return BellmanResult(paths, costs)


CORRIDOR_ROUNDS = 10


@dataclass
class CorridorResult:
    """The iterated corridor student DP's answer: the paths of the seeds' budgets, their costs, the rounds run."""

    paths: dict[int, list[int]]
    costs: dict[int, float]
    rounds: int


@torch.no_grad()
def student_dp_corridor(denoiser, noise: torch.Tensor, grid: list[float], solver: str, seeds: dict[int, list[int]],
                        teacher_states: torch.Tensor, width: int, *, max_rounds: int = CORRIDOR_ROUNDS,
                        progress: bool = False) -> CorridorResult:
    """Iterated corridor student DP: :func:`student_dp` inside :func:`corridor_bands` of half-width ``width``
    around ``seeds`` ({K: path}), re-centred on its answer until no node of any path moved by ``width`` or
    more (an answer inside its corridor; Luus 1990, iterative dynamic programming), a path repeats, or
    ``max_rounds`` rounds. Each round costs ≈ Σ_K K·(2·width + 1) model calls instead of the full DP's ≈ K·n."""
    if width < 1:
        raise StepsmithError(f"`student_corridor` must be at least 1 grid node, got {width}", param="student_corridor")
    n = len(grid) - 1
    paths = {K: list(p) for K, p in seeds.items()}
    seen = {tuple(tuple(paths[K]) for K in sorted(paths))}
    costs: dict[int, float] = {}
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        res = student_dp(denoiser, noise, grid, solver, max(paths), teacher_states, progress=progress,
                         bands=corridor_bands(n, list(paths.values()), width))
        new = {K: res.paths[K] for K in paths}
        costs = {K: res.costs[K] for K in paths}
        inside = all(abs(a - b) < width for K in paths for a, b in zip(new[K], paths[K]))
        key = tuple(tuple(new[K]) for K in sorted(new))
        paths = new
        if inside or key in seen:
            break
        seen.add(key)
    return CorridorResult(paths, costs, rounds)


@torch.no_grad()
def student_dp_per_sample(denoiser, noise: torch.Tensor, grid: list[float], budgets: list[int],
                          teacher_states: torch.Tensor) -> dict[int, torch.Tensor]:
    """OSS's per-sample student-state DP (Wang et al. 2025, ``search_OSS``), batched over samples.

    Every sample runs its own DP: level k holds, per node j, that sample's best k-step first-order
    (Euler = DDIM) student state, scored by its own mean squared error against the teacher's state at
    j; the model is evaluated once per useful node and level for the whole batch (nodes from which no
    budget can still finish are skipped), about K·n batched calls. Returns {K: [B, K+1] paths 0 → n}.
    """
    n, Ks = len(grid) - 1, sorted(set(budgets))
    validate_budget(Ks[-1], n)
    T = teacher_states.to(torch.float64)
    B, red = noise.shape[0], tuple(range(2, T.ndim))
    err = torch.full((n + 1, B), math.inf, dtype=torch.float64)
    err[0] = 0.0
    xs = torch.zeros((n + 1, *noise.shape), dtype=noise.dtype)
    xs[0] = noise
    back = torch.zeros((Ks[-1] + 1, n + 1, B), dtype=torch.long)

    def top(k: int) -> int:  # the last interior node where a k-step state can still finish some budget
        return n - min((K - k for K in Ks if K > k), default=n + 1)

    for k in range(1, Ks[-1] + 1):
        new_err, new_x = torch.full_like(err, math.inf), xs.clone()
        targets = list(range(k, top(k) + 1)) + [n] * (k in Ks)
        for i in range(k - 1, top(k - 1) + 1):
            js = [j for j in targets if j > i]
            if not js or not torch.isfinite(err[i]).any():
                continue
            di = denoiser.denoise(xs[i], torch.full((B,), grid[i], dtype=noise.dtype))
            check_finite(di, "a student state")
            pred = jump_all(denoiser, "euler", RollState(xs[i], di), grid[i], [grid[j] for j in js])
            e = ((pred.to(torch.float64) - T[js]) ** 2).mean(dim=red)  # [nj, B]
            better = e < new_err[js]
            for q, j in enumerate(js):
                m = better[q]
                new_err[j] = torch.where(m, e[q], new_err[j])
                back[k, j] = torch.where(m, torch.full_like(back[k, j], i), back[k, j])
                new_x[j][m] = pred[q][m]
        err, xs = new_err, new_x
    out = {}
    for K in Ks:
        paths = torch.zeros((B, K + 1), dtype=torch.long)
        paths[:, K] = n
        for k in range(K, 0, -1):
            paths[:, k - 1] = back[k, paths[:, k], torch.arange(B)]
        out[K] = paths
    return out


def aggregate_paths(paths: torch.Tensor, how: str = "median") -> list[int]:
    """One model-level path from per-sample paths [B, K+1] (grid indices), step by step.

    "median" is OSS's ``cal_medium`` (the floor of the mean of the two middle values of the sorted
    per-sample indices); "mean" rounds the per-step mean. Both keep the path strictly increasing,
    because every per-sample path is.
    """
    if how == "median":
        srt = paths.sort(dim=0).values
        B = paths.shape[0]
        return ((srt[B // 2] + srt[B // 2 - 1]) // 2 if B > 1 else srt[0]).tolist()
    if how == "mean":
        return paths.to(torch.float64).mean(0).round().long().tolist()
    raise StepsmithError(f"unknown path aggregation {how!r}; use median or mean", param="reduce")


# --------------------------------------------------------------------------- final-error refinement


@torch.no_grad()
def final_error(denoiser, solver: str, sigmas: list[float], noise: torch.Tensor, target: torch.Tensor,
                score=None) -> float:
    """``score(final samples)`` of ``solver`` along ``sigmas`` (default: the mse against ``target``)."""
    x = rollout(denoiser, solver, sigmas, x=noise)
    return mse(x, target) if score is None else score(x)


REFINE_MOVES = ("pattern", "coarse-fine", "candidates")


def _trial_final(denoiser, solver: str, grid: list[float], trial: list[int], m: int, noise, states):
    """Final samples and node states of ``trial`` (node m moved), rolled out from the cached state before m
    (K − m + 1 model calls; the states before m are reused, so an accepted trial needs no re-rollout)."""
    if m == 0:
        return rollout(denoiser, solver, [grid[i] for i in trial], x=noise, keep=True)
    xf, tail = rollout(denoiser, solver, [grid[i] for i in trial[m - 1:]], start=states[m - 1], keep=True)
    return xf, states[:m - 1] + tail


class _OutOfCalls(Exception):
    """Raised inside :func:`refine_final_error` when the next trial would pass ``max_calls``."""


def _first_step(lo: int, hi: int) -> int:
    """The pattern search's coarse step between bounds ``lo`` and ``hi``: a quarter of the free range, at least 1."""
    return max(1, (hi - lo) // 4)


@torch.no_grad()
def refine_final_error(denoiser, solver: str, grid: list[float], path: list[int], noise: torch.Tensor,
                       target: torch.Tensor, *, candidates: int = 12, max_sweeps: int = 4, free_start: bool = False,
                       progress: bool = False, score=None, moves: str = "candidates",
                       start: tuple[float, list] | None = None,
                       max_calls: int | None = None, stats: dict | None = None, resume: dict | None = None,
                       on_node: Callable[[dict], None] | None = None) -> tuple[list[int], float, int]:
    """Coordinate descent of the interior nodes of ``path`` on the final error against ``target``.

    Every trial rolls the solver out from the cached state before the node it moves (K − m + 1 calls).
    ``moves`` is how a node m between its neighbours is searched:

    * ``"candidates"`` — try up to ``candidates`` grid nodes strictly between the neighbours (evenly
      spread, the current one included), keep the argmin.
    * ``"pattern"`` — a compass (pattern) search on the grid index (Hooke & Jeeves 1961): try ±δ,
      accept the first improvement and go on with the same δ, halve δ when neither side improves;
      δ starts at a quarter of the free range in the first sweep and at 1 in later sweeps, and a later
      sweep skips a node when neither it nor a neighbour moved since it was last searched
      (``candidates`` is unused).
    * ``"coarse-fine"`` — the first sweep tries ``candidates`` evenly spread nodes (a wide look, as
      ``"candidates"``), later sweeps the ±1 pattern search of nodes whose neighbourhood moved.

    Sweeps run until no node moves (or ``max_sweeps``). With ``free_start`` the first node moves too
    (the noise is then taken as the state at a later node, like diffusers' 'leading' spacing).
    ``score(final samples) -> float`` replaces the mse against ``target``
    (:mod:`schedules.search.objectives`). ``start`` = (score, node states) of ``path`` from an earlier
    ``rollout(..., keep=True)`` saves its rollout. A later sweep skips a node when no other node moved since
    its last search of the same kind (that search would end the same: exact). ``max_calls`` caps the
    denoiser's call counter: a trial that would pass it is not run and the search returns the best path so
    far (every accepted move lowered the error, so stopping early never returns a worse path than the start),
    setting ``stats["out_of_calls"]`` when ``stats`` is a dict.
    ``on_node(state)`` is called after every node search with the search's whole state (JSON-able); passed
    back as ``resume`` (with ``start`` = the score and node states of ``state["path"]``), the search goes
    on from the next node exactly as it would have (the resumable dp search, :mod:`schedules.search.dp_method`).
    Returns (path, error, sweeps).
    """
    if moves not in REFINE_MOVES:
        raise StepsmithError(f"unknown refinement `moves` {moves!r}; use one of {', '.join(REFINE_MOVES)}",
                             param="moves")
    if score is None:
        def score(x):
            return mse(x, target)
    path = list(path)
    K = len(path) - 1

    if start is None:
        x_fin, states = rollout(denoiser, solver, [grid[i] for i in path], x=noise, keep=True)
        best = score(x_fin)
    else:
        best, states = float(start[0]), list(start[1])
    per_step = get_solver(solver).evals_per_step
    sweeps, clock = 0, 0
    visited = [-1] * (K + 1)  # clock of each node's last search
    moved_at = [0] * (K + 1)  # clock of each node's last move (0: the start counts as a move)
    kind = [None] * (K + 1)  # whether each node's last search was local (±δ) or over spread candidates
    first_sweep, done_m, moved = 0, -1, False
    if resume is not None:
        if list(resume["path"]) != path or len(resume["visited"]) != K + 1:
            raise StepsmithError("the refinement state to resume belongs to another path", param="resume")
        sweeps, clock = int(resume["sweeps"]), int(resume["clock"])
        visited, moved_at, kind = list(resume["visited"]), list(resume["moved_at"]), list(resume["kind"])
        first_sweep, done_m, moved = int(resume["sweep"]), int(resume["m"]), bool(resume["moved"])
    try:
        for sweep in tqdm(range(first_sweep, max_sweeps), desc="refine", disable=not progress, leave=False):
            resumed = resume is not None and sweep == first_sweep  # the sweep the saved state stopped in
            if not resumed:
                sweeps += 1
                moved = False
            for m in range(0 if free_start else 1, K):
                if resumed and m <= done_m:
                    continue
                lo, hi = (path[m - 1] + 1 if m > 0 else 0), path[m + 1] - 1
                if hi <= lo:
                    continue
                local = moves == "pattern" or (moves == "coarse-fine" and sweep > 0)
                if local and sweep > 0 and max(moved_at[max(m - 1, 0):m + 2]) <= visited[m]:
                    continue
                # exact skip: no other node moved since node m's last search, of the same kind, so it would end the same
                if sweep > 0 and kind[m] == local and max(moved_at[:m] + moved_at[m + 1:], default=0) <= visited[m]:
                    continue
                clock += 1
                visited[m], kind[m] = clock, local

                # bound now: searching node m changes neither the nodes around it nor the states before it
                def trial_error(c: int, m=m, path=path, states=states) -> tuple[float, list[int], list]:
                    if max_calls is not None and getattr(denoiser, "calls", 0) + (K - m + 1) * per_step > max_calls:
                        raise _OutOfCalls
                    trial = path[:m] + [c] + path[m + 1:]
                    xf, st = _trial_final(denoiser, solver, grid, trial, m, noise, states)
                    return score(xf), trial, st

                node_moved = False
                if local:
                    step = _first_step(lo, hi) if sweep == 0 else 1
                    while step >= 1:
                        for c in (path[m] + step, path[m] - step):
                            if lo <= c <= hi:
                                e, trial, st = trial_error(c)
                                if e < best - 1e-12 * max(1.0, abs(best)):
                                    best, path, states, node_moved = e, trial, st, True
                                    break
                        else:
                            step //= 2
                else:
                    opts = sorted(set(torch.linspace(lo, hi, min(candidates, hi - lo + 1)).round().long().tolist())
                                  | {path[m]})
                    for c in opts:
                        if c == path[m]:
                            continue
                        e, trial, st = trial_error(c)
                        if e < best - 1e-12 * max(1.0, abs(best)):
                            best, path, node_moved, new_states = e, trial, True, st
                if node_moved:
                    moved = True
                    clock += 1
                    moved_at[m] = clock
                    if not local:
                        states = new_states
                if on_node is not None:
                    on_node({"path": list(path), "best": best, "sweeps": sweeps, "clock": clock, "sweep": sweep,
                             "m": m, "moved": moved, "visited": list(visited), "moved_at": list(moved_at),
                             "kind": list(kind)})
            if not moved:
                break
    except _OutOfCalls:  # path and best already hold the last accepted trial
        if stats is not None:
            stats["out_of_calls"] = True
    return path, best, sweeps
