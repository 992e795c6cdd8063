"""Shared machinery of the search methods: grids, the search teacher, vectorised jumps, rollouts.

A *grid* is a descending list of n+1 native sigmas ending in the terminal 0, built by the
model's convention (:meth:`search_grid`): flow models use uniform σ from 1 to 0; VP models use
distinct integer timesteps spaced by EDM's ρ = 7 between t = T-1 and t = 0 (so every searched VP
table replays exactly in diffusers). A table of K steps is a path 0 = g_0 < g_1 < ... < g_K = n of
grid indices: the model is evaluated at the first K.

Rollouts and the reference pass run the one integration loop of :mod:`schedules.solvers`; the
reference pass is the :mod:`schedules.teacher` on the search grid, so every searched table names
the teacher its objective was measured against (:func:`final_mse_kind`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from schedules.io import StepsmithError
from schedules.solvers import NodeState, get_solver, integrate
from schedules.teacher import Teacher, teacher_sample

# --------------------------------------------------------------------------- grids


def make_grid(conv, n: int, kind: str = "auto") -> list[float]:
    """n+1 descending native sigmas ending in 0 (n evaluated nodes), from the convention's search grid."""
    if n < 2:
        raise StepsmithError(f"grid size must be at least 2, got {n}")
    return conv.search_grid(n, kind)


def grid_index(grid: list[float], sigmas: list[float]) -> list[int]:
    """Indices of table sigmas on the grid (nearest node; exact for tables searched on it)."""
    g = torch.tensor(grid, dtype=torch.float64)
    return [int(torch.argmin((g - s).abs())) for s in sigmas]


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


def validate_budget(K: int, n: int, what: str = "grid") -> None:
    if K < 1:
        raise StepsmithError(f"the budget gives {K} steps; NFE must be at least 1")
    if K > n:
        raise StepsmithError(f"{K} steps do not fit a {what} of {n + 1} nodes; use NFE below the grid size "
                             f"or a finer grid (--grid)")


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


# --------------------------------------------------------------------------- the search teacher


def substep_grid(grid: list[float], substeps: int = 1) -> list[float]:
    """``grid`` with every interval split into ``substeps`` equal steps in σ (the grid's nodes kept exactly)."""
    if substeps <= 1:
        return list(grid)
    fine: list[float] = []
    for s_a, s_b in zip(grid[:-1], grid[1:]):
        fine += torch.linspace(s_a, s_b, substeps + 1, dtype=torch.float64).tolist()[:-1]
    return fine + [grid[-1]]


def search_teacher(grid: list[float], substeps: int = 1) -> Teacher:
    """Heun on the search grid (``substeps`` Heun steps per interval): the teacher of dp and evolution."""
    label = "search-grid" if substeps <= 1 else f"search-grid-x{substeps}"
    return Teacher.on_grid(substep_grid(grid, substeps), "heun", label=label)


def final_mse_kind(teacher: Teacher) -> str:
    """``objective_kind`` of a final-sample error measured against ``teacher``."""
    return f"final mse vs {teacher.name} (search samples)"


@dataclass
class Reference:
    """Teacher states on the grid for a micro-batch: x[i] and D(x[i], s_i) for i = 0..n-1, x[n] final."""

    x: torch.Tensor  # [n+1, b, ...]
    d: torch.Tensor  # [n, b, ...]


@torch.no_grad()
def reference_pass(denoiser, noise: torch.Tensor, grid: list[float], substeps: int = 1) -> Reference:
    """The search teacher's states and denoised values at the grid's nodes (:func:`search_teacher`).

    The first evaluation of every Heun step at a node is the D(x_i, s_i) that the cost matrix reuses.
    """
    run = teacher_sample(denoiser, noise, search_teacher(grid, substeps), nodes=grid)
    check_finite(run.denoised, "the reference trajectory")
    check_finite(run.states, "the reference trajectory")
    return Reference(run.states, run.denoised[:-1])


# --------------------------------------------------------------------------- rollouts

RollState = NodeState  # solver state at an evaluated node: (x, x0, x0_prev, s_prev)


@torch.no_grad()
def one_step(denoiser, solver: str, st: NodeState, s: float, s_next: float) -> torch.Tensor:
    """One ``solver`` step from the evaluated state ``st`` at ``s`` to ``s_next``."""
    return get_solver(solver).step(denoiser.convention, denoiser.denoise, st.x, st.x0, s, s_next,
                                   (st.x0_prev, st.s_prev))


@torch.no_grad()
def rollout(denoiser, solver: str, sigmas: list[float], start: NodeState | None = None,
            x: torch.Tensor | None = None, keep: bool = False):
    """Run ``solver`` along ``sigmas`` (ending in 0). Start from a state already evaluated at sigmas[0]
    (``start``) or from a raw ``x``. Returns the final x and, with ``keep``, the state at every evaluated node."""
    states: list[NodeState] = []

    def on_node(_i: int, _s: float, st: NodeState) -> None:
        check_finite(st.x0, "a search rollout")
        if keep:
            states.append(st)

    x_final = integrate(denoiser, start if start is not None else x, sigmas, solver, on_node=on_node)
    return (x_final, states) if keep else x_final
