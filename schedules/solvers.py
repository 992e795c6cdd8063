"""Deterministic ODE solvers that integrate along a sigma table (k-diffusion style).

All solvers see a *denoiser* ``D(x, s) -> x0`` in the model's native convention (see
:mod:`schedules.conventions`) and integrate the probability-flow ODE written as

    y = x / c(s),    dy/ds = (y - D(x, s)) / s

with c(s) = 1 for flow models (so y = x, dy/ds = ε - x0, the FlowMatch velocity) and
c(s) = α(s) for VP models (y is the EDM state x0 + s·ε, s the EDM sigma). In both
cases the first-order step is exactly DDIM, so ``euler`` and ``ddim`` are the same solver
(kept as two names to match diffusers' vocabulary).

NFE (model evaluations) for a table of K steps (K+1 sigmas ending in 0):

* ``euler`` / ``ddim`` / ``dpmpp-2m``: K.
* ``heun``: 2K - 1 — two evaluations per step, except the final jump to σ=0, which is an
  Euler step (k-diffusion and diffusers' HeunDiscrete do the same).

Classifier-free guidance doubles every count; stepsmith reports evaluations of the
denoiser as the user passes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from schedules.conventions import Convention
from schedules.io import StepsmithError


class Denoiser(Protocol):
    """What a solver needs: the convention and x0 estimates at native sigmas."""

    convention: Convention

    def denoise(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SolverSpec:
    name: str
    order: int
    evals_per_step: int
    description: str

    def nfe(self, steps: int) -> int:
        """Model evaluations for ``steps`` steps ending at σ=0."""
        if steps < 1:
            raise StepsmithError("a table needs at least one step")
        return 2 * steps - 1 if self.evals_per_step == 2 else steps

    def steps_for_nfe(self, nfe: int) -> int:
        """Most steps whose NFE fits in ``nfe`` (Heun: odd budgets are used exactly)."""
        if nfe < 1:
            raise StepsmithError(f"NFE must be at least 1, got {nfe}")
        return (nfe + 1) // 2 if self.evals_per_step == 2 else nfe


SOLVERS: dict[str, SolverSpec] = {
    "euler": SolverSpec("euler", 1, 1, "first-order Euler (identical to DDIM)"),
    "ddim": SolverSpec("ddim", 1, 1, "DDIM = first-order DPM-Solver (identical to Euler)"),
    "heun": SolverSpec("heun", 2, 2, "Heun's 2nd-order method (EDM), Euler on the last step"),
    "dpmpp-2m": SolverSpec("dpmpp-2m", 2, 1, "DPM-Solver++(2M) multistep, first order on the last step"),
}


def get_solver(name: str) -> SolverSpec:
    try:
        return SOLVERS[name]
    except KeyError:
        raise StepsmithError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None


def _expand(s: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar sigma → a [B] tensor in x's dtype (what denoisers receive)."""
    return torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)


def ode_derivative(conv: Convention, x: torch.Tensor, s: float, x0: torch.Tensor) -> torch.Tensor:
    """dy/ds at native sigma s, in the solver's coordinates y = x / c(s)."""
    c = float(conv.ode_scale(torch.tensor(s, dtype=torch.float64)))
    return (x / c - x0) / s


# ------------------------------------------------------------------- single steps
# Each step takes the state at sigma s (and the denoiser output there, already computed)
# and returns the state at s_next. These are what search methods call for one jump.


def euler_step(conv: Convention, x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    c, c_next = (float(conv.ode_scale(torch.tensor(v, dtype=torch.float64))) for v in (s, s_next))
    y = x / c
    y_next = y + (s_next - s) * (y - x0) / s
    return y_next * c_next


def heun_step(conv: Convention, denoise: Callable, x: torch.Tensor, x0: torch.Tensor, s: float,
              s_next: float) -> torch.Tensor:
    """One Heun step; makes one more denoiser call unless ``s_next`` is 0."""
    if s_next == 0:
        return euler_step(conv, x, x0, s, s_next)
    c, c_next = (float(conv.ode_scale(torch.tensor(v, dtype=torch.float64))) for v in (s, s_next))
    y = x / c
    d = (y - x0) / s
    y_euler = y + (s_next - s) * d
    x0_next = denoise(y_euler * c_next, _expand(s_next, x))
    d_next = (y_euler - x0_next) / s_next
    return (y + (s_next - s) * (d + d_next) / 2) * c_next


def _lambda(conv: Convention, s: float) -> float:
    """Half logSNR λ = log(α/σ_t); -inf at pure noise, +inf at s=0."""
    a = float(conv.alpha(torch.tensor(s, dtype=torch.float64)))
    st = float(conv.sigma_t(torch.tensor(s, dtype=torch.float64)))
    if st == 0:
        return math.inf
    if a == 0:
        return -math.inf
    return math.log(a / st)


def dpmpp_2m_step(conv: Convention, x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float,
                  x0_prev: torch.Tensor | None, s_prev: float | None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, k-diffusion ``sample_dpmpp_2m``) in (α, σ_t) form.

    Written with ratios instead of exp(-h) so that σ=1 (α=0) of flow models and the final
    σ=0 are exact: x' = (σ_t'/σ_t)·x + α'·(1 - e^{-h})·D, e^{-h} = α·σ_t' / (α'·σ_t).
    """
    t64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    a, st = float(conv.alpha(t64(s))), float(conv.sigma_t(t64(s)))
    a_n, st_n = float(conv.alpha(t64(s_next))), float(conv.sigma_t(t64(s_next)))
    exp_neg_h = (a * st_n) / (a_n * st)
    d = x0
    if x0_prev is not None and s_next > 0:
        h = _lambda(conv, s_next) - _lambda(conv, s)
        h_last = _lambda(conv, s) - _lambda(conv, s_prev)
        if math.isfinite(h_last) and h_last > 0:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (st_n / st) * x + a_n * (1 - exp_neg_h) * d


# ------------------------------------------------------------------- samplers


def check_sigmas(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    """Validate a sampling sigma list: strictly decreasing, ending in exactly 0."""
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(s) < 2:
        raise StepsmithError("sigmas need at least two values (start and the terminal 0)")
    if any(not math.isfinite(v) for v in s):
        raise StepsmithError("sigmas contain NaN or Inf")
    if s[-1] != 0:
        raise StepsmithError(f"sigmas must end in exactly 0 (the terminal value), got {s[-1]:g}; append 0")
    bad = [i for i in range(len(s) - 1) if not s[i] > s[i + 1]]
    if bad:
        i = bad[0]
        raise StepsmithError(
            f"sigmas must be strictly decreasing (sampling runs from noise to data): "
            f"sigmas[{i}]={s[i]:g} <= sigmas[{i + 1}]={s[i + 1]:g}; sort them and drop duplicates"
        )
    return s


@torch.no_grad()
def sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: Sequence[float] | torch.Tensor,
           solver: str = "euler", *, progress: bool = False,
           callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate from ``noise`` (the state at ``sigmas[0]``) down to σ=0.

    ``callback(i, s_i, x_i, x0_i)`` is called at every evaluated node. Returns the final
    state (the data estimate).
    """
    spec = get_solver(solver)
    s = check_sigmas(sigmas)
    conv = denoiser.convention
    x = noise
    x0_prev, s_prev = None, None
    steps = range(len(s) - 1)
    for i in tqdm(steps, desc=f"sampling ({solver})", disable=not progress, leave=False):
        x0 = denoiser.denoise(x, _expand(s[i], x))
        if callback is not None:
            callback(i, s[i], x, x0)
        if spec.name in ("euler", "ddim"):
            x = euler_step(conv, x, x0, s[i], s[i + 1])
        elif spec.name == "heun":
            x = heun_step(conv, denoiser.denoise, x, x0, s[i], s[i + 1])
        else:
            x = dpmpp_2m_step(conv, x, x0, s[i], s[i + 1], x0_prev, s_prev)
        x0_prev, s_prev = x0, s[i]
    return x


def reference_sigmas(conv: Convention, steps: int = 200) -> list[float]:
    """A fine grid for the high-accuracy reference sampler (the teacher).

    Flow: uniform in σ from 1 to 0. VP: EDM's ρ=7 spacing between the model's σ_max and
    σ_min, then the final jump to 0.
    """
    if conv.name == "flow":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    return karras_sigmas(conv.sigma_min, conv.sigma_max, steps) + [0.0]


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """n sigmas from sigma_max down to sigma_min, EDM (Karras et al. 2022) ρ spacing."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist()


@torch.no_grad()
def reference_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int = 200, *,
                     progress: bool = False) -> torch.Tensor:
    """High-accuracy teacher: Heun on :func:`reference_sigmas` (2·steps-1 evaluations)."""
    return sample(denoiser, noise, reference_sigmas(denoiser.convention, steps), "heun", progress=progress)
