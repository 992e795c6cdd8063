"""Shared machinery of the search methods: grids, reference trajectories, vectorised jumps, rollouts.

A *grid* is a descending list of n+1 native sigmas ending in the terminal 0: flow models use
uniform σ from 1 to 0; VP models use distinct integer timesteps spaced by EDM's ρ = 7 between
t = T-1 and t = 0 (so every searched VP table replays exactly in diffusers). A table of K steps
is a path 0 = g_0 < g_1 < ... < g_K = n of grid indices: the model is evaluated at the first K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from schedules.baselines import distinct_descending_ints
from schedules.io import StepsmithError
from schedules.solvers import get_solver, karras_sigmas

# --------------------------------------------------------------------------- grids


def make_grid(conv, n: int, kind: str = "auto") -> list[float]:
    """n+1 descending native sigmas ending in 0 (n evaluated nodes)."""
    if n < 2:
        raise StepsmithError(f"grid size must be at least 2, got {n}")
    if conv.name == "flow":
        if kind not in ("auto", "uniform"):
            raise StepsmithError(f"flow grids are uniform in σ; unknown grid kind {kind!r}")
        return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).tolist()
    T = conv.num_train_timesteps
    if n > T:
        raise StepsmithError(f"a VP grid has at most {T} nodes (the training timesteps); got --grid {n}")
    if kind in ("auto", "rho"):
        sig = torch.tensor(karras_sigmas(conv.sigma_min, conv.sigma_max, n, 7.0), dtype=torch.float64)
        ts = conv.model_time(sig.clamp(conv.sigma_min, conv.sigma_max)).tolist()
    elif kind == "uniform":
        ts = torch.linspace(T - 1, 0, n, dtype=torch.float64).tolist()
    else:
        raise StepsmithError(f"unknown VP grid kind {kind!r}; use rho or uniform")
    ts = distinct_descending_ints(ts, T)
    return conv.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist() + [0.0]


def grid_index(grid: list[float], sigmas: list[float], tol: float = 1e-9) -> list[int]:
    """Indices of table sigmas on the grid (nearest node; exact for tables searched on it)."""
    g = torch.tensor(grid, dtype=torch.float64)
    out = []
    for s in sigmas:
        out.append(int(torch.argmin((g - s).abs())))
    return out


def snap_path(grid: list[float], sigmas: list[float]) -> list[int]:
    """Nearest strictly increasing grid path for a table (start at node 0, end at the terminal)."""
    n = len(grid) - 1
    idx = grid_index(grid, sigmas[:-1])
    idx[0] = 0
    K = len(idx)
    for m in range(1, K):
        idx[m] = max(idx[m], idx[m - 1] + 1)
    for m in range(K - 1, 0, -1):
        idx[m] = min(idx[m], n - (K - m))
        if idx[m] <= idx[m - 1] and m - 1 > 0:
            idx[m - 1] = idx[m] - 1
    return idx + [n]


# --------------------------------------------------------------------------- jump coefficients


def _f64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


def first_order_coeffs(conv, s_i: float, s_j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_j ≈ A·x_i + B·D_i for one DDIM/Euler step (identical to first-order DPM-Solver++)."""
    s_j = _f64(s_j)
    c_i = conv.ode_scale(_f64(s_i))
    c_j = conv.ode_scale(s_j)
    ratio = s_j / s_i
    return c_j / c_i * ratio, c_j * (1 - ratio)


def half_lambda(conv, s: torch.Tensor) -> torch.Tensor:
    s = _f64(s)
    a, st = conv.alpha(s), conv.sigma_t(s)
    with torch.no_grad():
        return torch.log(a) - torch.log(st)


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise StepsmithError(f"{what} contains NaN/Inf: the model returned non-finite values during the search; "
                             "check the weights, the dtype (try float32) and --prediction")


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean())


# --------------------------------------------------------------------------- reference pass


@dataclass
class Reference:
    """Teacher states on the grid for a micro-batch: x[i] and D(x[i], s_i) for i = 0..n-1, x[n] final."""

    x: torch.Tensor  # [n+1, b, ...]
    d: torch.Tensor  # [n, b, ...]


def _sig(s: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)


@torch.no_grad()
def reference_pass(denoiser, noise: torch.Tensor, grid: list[float], substeps: int = 1) -> Reference:
    """Heun on the grid (``substeps`` Heun steps per interval), storing states and denoised values at nodes.

    The first evaluation of every Heun step at a node is the D(x_i, s_i) that the cost matrix reuses.
    """
    conv = denoiser.convention
    n = len(grid) - 1
    xs = [noise]
    ds = []
    x = noise
    for i in range(n):
        s_a, s_b = grid[i], grid[i + 1]
        sub = torch.linspace(s_a, s_b, substeps + 1, dtype=torch.float64).tolist() if substeps > 1 else [s_a, s_b]
        for m in range(len(sub) - 1):
            d = denoiser.denoise(x, _sig(sub[m], x))
            check_finite(d, "the reference trajectory")
            if m == 0:
                ds.append(d)
            x = _heun(conv, denoiser, x, d, sub[m], sub[m + 1])
        xs.append(x)
    return Reference(torch.stack(xs), torch.stack(ds))


def _heun(conv, denoiser, x, d, s, s_next):
    from schedules.solvers import heun_step

    return heun_step(conv, denoiser.denoise, x, d, s, s_next)


# --------------------------------------------------------------------------- rollouts


@dataclass
class RollState:
    """Solver state at an evaluated node: x, D there, and the previous node's D/σ (for DPM++(2M))."""

    x: torch.Tensor
    d: torch.Tensor
    d_prev: torch.Tensor | None
    s_prev: float | None


@torch.no_grad()
def one_step(denoiser, solver: str, st: RollState, s: float, s_next: float) -> torch.Tensor:
    from schedules.solvers import dpmpp_2m_step, euler_step, heun_step

    conv = denoiser.convention
    if solver in ("euler", "ddim"):
        return euler_step(conv, st.x, st.d, s, s_next)
    if solver == "heun":
        return heun_step(conv, denoiser.denoise, st.x, st.d, s, s_next)
    return dpmpp_2m_step(conv, st.x, st.d, s, s_next, st.d_prev, st.s_prev)


@torch.no_grad()
def rollout(denoiser, solver: str, sigmas: list[float], start: RollState | None = None,
            x: torch.Tensor | None = None, keep: bool = False):
    """Run ``solver`` along ``sigmas`` (ending in 0). Start from a state already evaluated at sigmas[0]
    (``start``) or from a raw ``x``. Returns the final x and, with ``keep``, the RollState at every node."""
    get_solver(solver)
    states: list[RollState] = []
    if start is None:
        d = denoiser.denoise(x, _sig(sigmas[0], x))
        check_finite(d, "a search rollout")
        start = RollState(x, d, None, None)
    st = start
    for m in range(len(sigmas) - 1):
        if keep:
            states.append(st)
        x_next = one_step(denoiser, solver, st, sigmas[m], sigmas[m + 1])
        if m + 1 == len(sigmas) - 1:
            return (x_next, states) if keep else x_next
        d_next = denoiser.denoise(x_next, _sig(sigmas[m + 1], x_next))
        check_finite(d_next, "a search rollout")
        st = RollState(x_next, d_next, st.d, sigmas[m])
    raise AssertionError("unreachable")


def path_sigmas(grid: list[float], path: list[int]) -> list[float]:
    return [grid[i] for i in path]


def validate_budget(K: int, n: int, what: str = "grid") -> None:
    if K < 1:
        raise StepsmithError(f"the budget gives {K} steps; NFE must be at least 1")
    if K > n:
        raise StepsmithError(f"{K} steps do not fit a {what} of {n + 1} nodes; use NFE below the grid size "
                             f"or a finer grid (--grid)")


def is_finite_number(v: float) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def reference_sigmas_for(conv, steps: int) -> list[float]:
    from schedules.solvers import reference_sigmas

    return reference_sigmas(conv, steps)
