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
  terminal node is the true final-sample error of the path.
* **Final-error refinement** (stepsmith): a plain local teacher-state DP loses to diffusers'
  defaults on final-sample error (REFERENCES.md), because local errors are not how errors
  propagate. Starting from a DP table, coordinate descent moves each interior node to the grid
  node between its neighbours that minimises the final error against the teacher on the search
  samples, until no move helps. This is the default of ``make_table(method="dp")``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from schedules.io import StepsmithError
from schedules.search.common import (
    RollState,
    check_finite,
    first_order_coeffs,
    half_lambda,
    make_grid,
    mse,
    reference_pass,
    rollout,
    validate_budget,
)
from schedules.solvers import get_solver

# --------------------------------------------------------------------------- distributed helpers


def _dist():
    """(rank, world, all_reduce_sum) — torch.distributed if initialised (accelerate launches it), else 1 process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

        return dist.get_rank(), dist.get_world_size(), reduce
    return 0, 1, lambda t: t


# --------------------------------------------------------------------------- cost matrices


@torch.no_grad()
def _costs_first_order(conv, grid, ref, weight_fn) -> torch.Tensor:
    """Sum over the micro-batch of squared errors of one first-order step, c[i][j] (j > i)."""
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
        C[i, i + 1:] = ((pred - xf[i + 1:]) ** 2).sum(1) / (numel / b)
    return C


@torch.no_grad()
def _costs_heun(denoiser, grid, ref) -> torch.Tensor:
    """Heun i → j from the teacher state at i: one more model call at j (batched over all j > i)."""
    conv = denoiser.convention
    n = len(grid) - 1
    b = ref.x.shape[1]
    shape = ref.x.shape[2:]
    numel_per = ref.x[0].numel() / b
    C = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    g = torch.tensor(grid, dtype=torch.float64)
    for i in range(n):
        x_i, d_i = ref.x[i].to(torch.float64), ref.d[i].to(torch.float64)
        js = list(range(i + 1, n + 1))
        A, B = first_order_coeffs(conv, grid[i], g[i + 1:])
        view = (-1, 1) + (1,) * len(shape)
        x_e = (A.view(view) * x_i[None] + B.view(view) * d_i[None])  # Euler predictions [nj, b, ...]
        inner = [k for k, j in enumerate(js) if grid[j] > 0]
        pred = x_e.clone()
        if inner:
            xe_in = x_e[inner].reshape(-1, *shape).to(ref.x.dtype)
            s_in = torch.tensor([grid[js[k]] for k in inner for _ in range(b)], dtype=ref.x.dtype)
            d_e = denoiser.denoise(xe_in, s_in)
            check_finite(d_e, "a Heun correction")
            d_e = d_e.reshape(len(inner), b, *shape).to(torch.float64)
            for q, k in enumerate(inner):
                j = js[k]
                s, sn = grid[i], grid[j]
                c_i = float(conv.ode_scale(torch.tensor(s, dtype=torch.float64)))
                c_j = float(conv.ode_scale(torch.tensor(sn, dtype=torch.float64)))
                y = x_i / c_i
                dd = (y - d_i) / s
                y_e = x_e[k] / c_j
                dn = (y_e - d_e[q]) / sn
                pred[k] = (y + (sn - s) * (dd + dn) / 2) * c_j
        C[i, i + 1:] = ((pred - ref.x[i + 1:].to(torch.float64)) ** 2).reshape(len(js), -1).sum(1) / numel_per
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


@torch.no_grad()
def teacher_dp(denoiser, noise: torch.Tensor, grid: list[float], solver: str, kmax: int, *,
               micro_batch: int = 16, late_weight: float = 1.0, substeps: int = 1,
               progress: bool = False, keep_states: bool = False) -> DPSearch:
    """BOSS/GITS teacher-state DP for every budget ≤ kmax, streaming costs over micro-batches.

    Memory grows with the micro-batch (n·b·D for one micro-batch's trajectories), not with the
    number of samples. ``keep_states`` additionally returns all teacher states (n·B·D, for the
    student-state DP, which needs them anyway) in ``extra["states"]``.
    """
    get_solver(solver)
    n = len(grid) - 1
    validate_budget(kmax, n)
    rank, world, reduce = _dist()
    conv = denoiser.convention
    calls0 = getattr(denoiser, "calls", 0)
    C = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    C3 = torch.zeros(n + 1, n + 1, n + 1, dtype=torch.float64) if solver == "dpmpp-2m" else None
    finals = torch.zeros_like(noise)
    states = torch.zeros((n + 1, *noise.shape), dtype=noise.dtype) if keep_states else None
    t_ref = t_dp = 0.0
    chunks = list(range(0, noise.shape[0], micro_batch))
    for ci in tqdm(range(len(chunks)), desc=f"dp ({solver})", disable=not progress or rank != 0, leave=False):
        if ci % world != rank:
            continue
        sl = slice(chunks[ci], chunks[ci] + micro_batch)
        t0 = time.perf_counter()
        ref = reference_pass(denoiser, noise[sl], grid, substeps)
        t1 = time.perf_counter()
        finals[sl] = ref.x[-1]
        if states is not None:
            states[:, sl] = ref.x
        if solver in ("euler", "ddim"):
            C += _costs_first_order(conv, grid, ref, None)
        elif solver == "heun":
            C += _costs_heun(denoiser, grid, ref)
        else:
            c2, c3 = _costs_dpmpp(conv, grid, ref)
            C += c2
            C3 += c3
        t_dp += time.perf_counter() - t1
        t_ref += t1 - t0
    C = reduce(C) / noise.shape[0]
    if C3 is not None:
        C3 = reduce(C3) / noise.shape[0]
    finals = reduce(finals)
    if states is not None:
        states = reduce(states)
    calls = int(reduce(torch.tensor(float(getattr(denoiser, "calls", 0) - calls0))).item())
    check_finite(C, "the cost matrix")
    t2 = time.perf_counter()
    if solver == "dpmpp-2m":
        res = bellman_all_augmented(C, C3, kmax, late_weight)
    else:
        res = bellman_all(C, kmax, late_weight)
    t_dp += time.perf_counter() - t2
    return DPSearch(grid, res, noise, finals, t_ref, t_dp, calls, {"cost": C, "states": states, "world": world})


# --------------------------------------------------------------------------- student-state DP (OSS)


@torch.no_grad()
def jump_all(denoiser, solver: str, st: RollState, s_i: float, s_js: list[float]) -> torch.Tensor:
    """One solver step from the state ``st`` at ``s_i`` to every sigma in ``s_js`` → [len(s_js), B, ...]."""
    conv = denoiser.convention
    if solver == "heun":
        from schedules.search.common import one_step

        return torch.stack([one_step(denoiser, solver, st, s_i, sj) for sj in s_js])
    sj = torch.tensor(s_js, dtype=torch.float64)
    A, B = first_order_coeffs(conv, s_i, sj)
    view = (-1,) + (1,) * st.x.ndim
    x, d = st.x.to(torch.float64), st.d.to(torch.float64)
    pred = A.view(view) * x[None] + B.view(view) * d[None]
    if solver == "dpmpp-2m" and st.d_prev is not None:
        lam_i = half_lambda(conv, torch.tensor(s_i, dtype=torch.float64))
        h_last = lam_i - half_lambda(conv, torch.tensor(st.s_prev, dtype=torch.float64))
        if torch.isfinite(h_last) and h_last > 0:
            pos = sj > 0
            h = torch.zeros_like(sj)
            h[pos] = half_lambda(conv, sj[pos]) - lam_i
            g = torch.where(pos, B * h / (2 * h_last), torch.zeros(()))
            pred = pred + g.view(view) * (d - st.d_prev.to(torch.float64))[None]
    return pred.to(st.x.dtype)


@torch.no_grad()
def student_dp(denoiser, noise: torch.Tensor, grid: list[float], solver: str, kmax: int,
               teacher_states: torch.Tensor, *, progress: bool = False) -> BellmanResult:
    """OSS-style forward DP over student states (Wang et al. 2025, "Optimal Stepsize for Diffusion Sampling").

    Level k keeps, for every node j, the best k-step path from node 0 to j judged by the error of the
    *student's* state at j against the teacher's (``teacher_states[j]``, [n+1, B, ...]); level-k states
    are re-evaluated by the model to extend them. The cost at the terminal node is the true final error.
    Memory: two levels of student states (2·n·B·D) — the argmin couples samples, so no micro-batching.
    """
    n = len(grid) - 1
    validate_budget(kmax, n)
    T = teacher_states.to(torch.float64)
    red = tuple(range(1, T.ndim))

    def errs(pred: torch.Tensor, js: list[int]) -> torch.Tensor:
        return ((pred.to(torch.float64) - T[js]) ** 2).mean(dim=red)

    d0 = denoiser.denoise(noise, torch.full((noise.shape[0],), grid[0], dtype=noise.dtype))
    check_finite(d0, "a student state")
    js = list(range(1, n + 1))
    pred = jump_all(denoiser, solver, RollState(noise, d0, None, None), grid[0], [grid[j] for j in js])
    e = errs(pred, js)
    best_e = {j: float(e[q]) for q, j in enumerate(js)}
    lvl_x = {j: pred[q] for q, j in enumerate(js) if j < n}
    lvl_dprev = {j: d0 for j in js}
    lvl_sprev = {j: grid[0] for j in js}
    back: list[dict[int, int]] = [{}, {j: 0 for j in js}]
    paths, costs = {1: [0, n]}, {1: best_e[n]}
    for k in tqdm(range(2, kmax + 1), desc="student dp", disable=not progress, leave=False):
        new_e: dict[int, float] = {}
        new_x: dict[int, torch.Tensor] = {}
        new_back: dict[int, int] = {}
        new_dprev: dict[int, torch.Tensor] = {}
        new_sprev: dict[int, float] = {}
        for i in sorted(lvl_x):
            xi = lvl_x[i]
            di = denoiser.denoise(xi, torch.full((xi.shape[0],), grid[i], dtype=xi.dtype))
            check_finite(di, "a student state")
            js = list(range(i + 1, n + 1))
            pred = jump_all(denoiser, solver, RollState(xi, di, lvl_dprev[i], lvl_sprev[i]), grid[i],
                            [grid[j] for j in js])
            e = errs(pred, js)
            for q, j in enumerate(js):
                v = float(e[q])
                if j not in new_e or v < new_e[j]:
                    new_e[j], new_back[j], new_dprev[j], new_sprev[j] = v, i, di, grid[i]
                    if j < n:
                        new_x[j] = pred[q]
        back.append(new_back)
        lvl_x, lvl_dprev, lvl_sprev = new_x, new_dprev, new_sprev
        if n in new_e:
            p = [n]
            for kk in range(k, 0, -1):
                p.append(back[kk][p[-1]])
            paths[k], costs[k] = p[::-1], new_e[n]
    return BellmanResult(paths, costs)


# --------------------------------------------------------------------------- final-error refinement


@torch.no_grad()
def final_error(denoiser, solver: str, sigmas: list[float], noise: torch.Tensor, target: torch.Tensor) -> float:
    return mse(rollout(denoiser, solver, sigmas, x=noise), target)


@torch.no_grad()
def refine_final_error(denoiser, solver: str, grid: list[float], path: list[int], noise: torch.Tensor,
                       target: torch.Tensor, *, candidates: int = 12, max_sweeps: int = 4, free_start: bool = False,
                       progress: bool = False) -> tuple[list[int], float, int]:
    """Coordinate descent of the interior nodes of ``path`` on the final error against ``target``.

    For each interior node m, try up to ``candidates`` grid nodes strictly between its neighbours
    (evenly spread, the current one included), roll the solver out from the cached state before m,
    keep the argmin; sweep until no node moves (or ``max_sweeps``). With ``free_start`` the first
    node moves too (the noise is then taken as the state at a later node, like diffusers' 'leading'
    spacing). Returns (path, error, sweeps).
    """
    path = list(path)
    K = len(path) - 1

    def full(p):
        return rollout(denoiser, solver, [grid[i] for i in p], x=noise, keep=True)

    x_fin, states = full(path)
    best = mse(x_fin, target)
    sweeps = 0
    for _sweep in tqdm(range(max_sweeps), desc="refine", disable=not progress, leave=False):
        sweeps += 1
        moved = False
        for m in range(0 if free_start else 1, K):
            lo, hi = (path[m - 1] + 1 if m > 0 else 0), path[m + 1] - 1
            if hi <= lo:
                continue
            opts = sorted(set(torch.linspace(lo, hi, min(candidates, hi - lo + 1)).round().long().tolist()) | {path[m]})
            for c in opts:
                if c == path[m]:
                    continue
                trial = path[:m] + [c] + path[m + 1:]
                if m == 0:
                    xf = rollout(denoiser, solver, [grid[i] for i in trial], x=noise)
                else:
                    xf = rollout(denoiser, solver, [grid[i] for i in trial[m - 1:]], start=states[m - 1])
                e = mse(xf, target)
                if e < best - 1e-12 * max(1.0, abs(best)):
                    best, path, moved = e, trial, True
            if moved:
                x_fin, states = full(path)
        if not moved:
            break
    return path, best, sweeps


def default_grid_size(conv, solver: str) -> int:
    return 100 if solver != "heun" else 60


def dp_grid(denoiser, grid: int | None, solver: str, kind: str = "auto") -> list[float]:
    n = grid or default_grid_size(denoiser.convention, solver)
    return make_grid(denoiser.convention, int(n), kind)


def require_samples(samples: int) -> int:
    if samples < 1:
        raise StepsmithError(f"--samples must be at least 1, got {samples}")
    return samples
