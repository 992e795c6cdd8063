"""Deterministic ODE solvers that integrate along a sigma table (k-diffusion style).

All solvers see a *denoiser* ``D(x, s) -> x0`` in the model's native convention (see
:mod:`schedules.conventions`) and integrate the probability-flow ODE written as

    y = x / c(s),    dy/ds = (y - D(x, s)) / s

with c(s) = 1 for flow models (so y = x, dy/ds = ε - x0, the FlowMatch velocity) and
c(s) = α(s) for VP models (y is the EDM state x0 + s·ε, s the EDM sigma). In both
cases the first-order step is exactly DDIM, so ``euler`` and ``ddim`` are the same solver
(kept as two names to match diffusers' vocabulary).

NFE (model evaluations) for a table of K steps (K+1 sigmas ending in 0):

* ``euler`` / ``ddim`` / ``dpmpp-2m`` / ``ipndm`` / ``unipc``: K (UniPC's corrector reuses the model
  output at the next node, so it costs no extra evaluation).
* ``heun``: 2K - 1 — two evaluations per step, except the final jump to σ=0, which is an
  Euler step (k-diffusion and diffusers' HeunDiscrete do the same).

Classifier-free guidance doubles every count; stepsmith reports evaluations of the
denoiser as the user passes it.

There is one integration loop, :func:`integrate`: sampling, the teacher
(:mod:`schedules.teacher`), search rollouts and distillation teacher data all run it, with
each :class:`SolverSpec` carrying its step function and an ``on_node`` callback recording
what a caller needs at the evaluated nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from schedules.conventions import Convention
from schedules.conventions import karras_sigmas as karras_sigmas
from schedules.io import StepsmithError


class Denoiser(Protocol):
    """What a solver needs: the convention and x0 estimates at native sigmas."""

    convention: Convention

    def denoise(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor: ...


@dataclass
class NodeState:
    """Solver state at an evaluated node: x there, D(x, s), and the previous node's D and σ (multistep)."""

    x: torch.Tensor
    x0: torch.Tensor
    x0_prev: torch.Tensor | None = None
    s_prev: float | None = None
    hist: tuple[torch.Tensor, ...] = ()  # dy/ds at earlier nodes, most recent first (solvers with ``history``;
    #                                      UniPC keeps the previous node's predecessor D and σ instead)


Prev = tuple  # (x0_prev, s_prev, *hist): the previous node's D and σ, then earlier derivatives (``history``)
StepFn = Callable[[Convention, Callable, torch.Tensor, torch.Tensor, float, float, Prev], torch.Tensor]


def _expand(s: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar sigma → a [B] tensor in x's dtype (what denoisers receive)."""
    return torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)


def _scale(conv: Convention, s: float) -> float:
    """c(s) as a Python float."""
    return float(conv.ode_scale(torch.tensor(s, dtype=torch.float64)))


def ode_derivative(conv: Convention, x: torch.Tensor, s: float, x0: torch.Tensor) -> torch.Tensor:
    """dy/ds at native sigma s, in the solver's coordinates y = x / c(s)."""
    return (x / _scale(conv, s) - x0) / s


# ------------------------------------------------------------------- single steps
# Each step takes the state at sigma s (and the denoiser output there, already computed)
# and returns the state at s_next. These are what search methods call for one jump.


def euler_step(conv: Convention, x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    c, c_next = _scale(conv, s), _scale(conv, s_next)
    y = x / c
    y_next = y + (s_next - s) * (y - x0) / s
    return y_next * c_next


def heun_predict(y: torch.Tensor, d: torch.Tensor, s: float, s_next) -> torch.Tensor:
    """Heun's Euler predictor in y-coordinates (``s_next`` may be a tensor broadcasting against ``y``)."""
    return y + (s_next - s) * d


def heun_correct(y: torch.Tensor, d: torch.Tensor, y_pred: torch.Tensor, x0_pred: torch.Tensor, s: float,
                 s_next) -> torch.Tensor:
    """Heun's trapezoidal corrector in y-coordinates, given D(x_pred, s_next) = ``x0_pred``."""
    d_next = (y_pred - x0_pred) / s_next
    return y + (s_next - s) * (d + d_next) / 2


def heun_step(conv: Convention, denoise: Callable, x: torch.Tensor, x0: torch.Tensor, s: float,
              s_next: float) -> torch.Tensor:
    """One Heun step; makes one more denoiser call unless ``s_next`` is 0."""
    if s_next == 0:
        return euler_step(conv, x, x0, s, s_next)
    c, c_next = _scale(conv, s), _scale(conv, s_next)
    y = x / c
    d = (y - x0) / s
    y_pred = heun_predict(y, d, s, s_next)
    x0_pred = denoise(y_pred * c_next, _expand(s_next, x))
    return heun_correct(y, d, y_pred, x0_pred, s, s_next) * c_next


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


# Uniform step functions: step(conv, denoise, x, x0, s, s_next, prev) -> x_next, prev = (x0_prev, s_prev).


def _euler(conv, _denoise, x, x0, s, s_next, _prev):
    return euler_step(conv, x, x0, s, s_next)


def _heun(conv, denoise, x, x0, s, s_next, _prev):
    return heun_step(conv, denoise, x, x0, s, s_next)


def _dpmpp_2m(conv, _denoise, x, x0, s, s_next, prev):
    return dpmpp_2m_step(conv, x, x0, s, s_next, prev[0], prev[1])


# Adams–Bashforth coefficients of iPNDM, by the number of earlier derivatives available (0..3).
IPNDM_COEFFS: tuple[tuple[float, ...], ...] = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12),
                                               (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm_step(conv: Convention, x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float,
               hist: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, DEIS; the solver of GITS, Chen et al. 2024): explicit Adams–Bashforth on dy/ds.

    The derivative d = (y - D)/s at this node and up to three earlier ones (``hist``, most recent
    first) are combined with the fixed equal-step AB coefficients of order len(hist)+1 ≤ 4 (the
    lower orders warm the method up over the first steps); one model call per step.
    """
    c, c_next = _scale(conv, s), _scale(conv, s_next)
    y = x / c
    ds = ((y - x0) / s, *hist[:3])
    slope = sum(w * d for w, d in zip(IPNDM_COEFFS[len(ds) - 1], ds))
    return (y + (s_next - s) * slope) * c_next


def _ipndm(conv, _denoise, x, x0, s, s_next, prev):
    return ipndm_step(conv, x, x0, s, s_next, prev[2:])


def _unipc_rhos(h: float, h_prev: float) -> tuple[float, float]:
    """UniC-2 weights (ρ_1, ρ_t) of the bh2 corrector: R·ρ = b with R = [[1, 1], [r, 1]], r = -h_prev/h,
    b_k = k!·(-h)·φ_{k+1}(-h) / B, B = e^{-h} - 1 (bh2's B(h) = e^h - 1 at the data-prediction sign of h);
    an infinite ``h_prev`` (the first node at λ = -inf) is the limit r → -inf: (0, b_1)."""
    hh, bh = -h, math.expm1(-h)
    phi = bh / hh - 1
    b1 = phi / bh
    b2 = 2 * (phi / hh - 0.5) / bh
    if not math.isfinite(h_prev):
        return 0.0, b1
    r = -h_prev / h
    return (b1 - b2) / (1 - r), (b2 - r * b1) / (1 - r)


def unipc_step(conv: Convention, x: torch.Tensor, x0: torch.Tensor, s: float, s_next: float,
               x0_prev: torch.Tensor | None = None, s_prev: float | None = None,
               x0_prev2: torch.Tensor | None = None, s_prev2: float | None = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models"), B(h) = e^h - 1 ("bh2"), data prediction, order 2 — diffusers' UniPCMultistepScheduler default.

    ``x`` is the predictor's state at ``s``, where the model gave ``x0`` = D(x, s). First the UniC corrector
    refines x with that output (no extra model call): x_c = x + α·B·(ρ_p·D1 - ρ_1·D1 - ρ_t·(D - D_prev)),
    the difference between the corrector's and the predictor's update from the previous node — order 1
    (ρ_t = 1/2) after a first-order predictor step, order 2 when the node before that is known (``x0_prev2``,
    ``s_prev2``). Then the UniP predictor steps x_c to ``s_next``: order 2, which is DPM-Solver++(2M)
    (D1 = (D - D_prev)·h/h_prev, ρ_p = 1/2), order 1 on the first step and on the last step to σ = 0
    (diffusers' ``lower_order_final``; the corrector after the last step would cost a model call and is
    never applied). Written with ratios like :func:`dpmpp_2m_step`, so α = 0 (flow σ = 1) and σ = 0 are exact.
    """
    t64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    a, st = float(conv.alpha(t64(s))), float(conv.sigma_t(t64(s)))
    lam = _lambda(conv, s)
    if x0_prev is not None and s_prev is not None:  # UniC at s, from the previous node's update
        h = lam - _lambda(conv, s_prev)
        bh = math.expm1(-h)
        if x0_prev2 is None or s_prev2 is None:
            corr = -0.5 * (x0 - x0_prev)
        else:
            h_prev = _lambda(conv, s_prev) - _lambda(conv, s_prev2)
            d1 = (x0_prev - x0_prev2) * (h / h_prev) if math.isfinite(h_prev) else torch.zeros_like(x0)
            rho_1, rho_t = _unipc_rhos(h, h_prev)
            corr = (0.5 - rho_1) * d1 - rho_t * (x0 - x0_prev)
        x = x + (a * bh) * corr
    a_n, st_n = float(conv.alpha(t64(s_next))), float(conv.sigma_t(t64(s_next)))
    exp_neg_h = (a * st_n) / (a_n * st)
    d = x0
    if x0_prev is not None and s_prev is not None and s_next > 0:  # UniP-2
        h, h_last = _lambda(conv, s_next) - lam, lam - _lambda(conv, s_prev)
        if math.isfinite(h_last) and h_last > 0:
            d = x0 + (0.5 * h / h_last) * (x0 - x0_prev)
    return (st_n / st) * x + a_n * (1 - exp_neg_h) * d


def _unipc_memory(_conv, st, _s) -> tuple[torch.Tensor, ...]:
    """What a UniPC node leaves for the next node's corrector: its own predecessor's D and σ."""
    if st.x0_prev is None:
        return ()
    return (st.x0_prev, torch.tensor(float(st.s_prev), dtype=torch.float64))


def _unipc(conv, _denoise, x, x0, s, s_next, prev):
    x0_prev2, s_prev2 = (prev[2], float(prev[3])) if len(prev) >= 4 else (None, None)
    return unipc_step(conv, x, x0, s, s_next, prev[0], prev[1], x0_prev2, s_prev2)


@dataclass(frozen=True)
class SolverSpec:
    name: str
    order: int
    evals_per_step: int
    description: str
    step: StepFn
    history: int = 0  # earlier derivatives the step needs (NodeState.hist), kept by :func:`integrate`
    memory: Callable | None = None  # (conv, state, s) -> what a node adds to NodeState.hist (default: its dy/ds)

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
    "euler": SolverSpec("euler", 1, 1, "first-order Euler (identical to DDIM)", _euler),
    "ddim": SolverSpec("ddim", 1, 1, "DDIM = first-order DPM-Solver (identical to Euler)", _euler),
    "heun": SolverSpec("heun", 2, 2, "Heun's 2nd-order method (EDM), Euler on the last step", _heun),
    "dpmpp-2m": SolverSpec("dpmpp-2m", 2, 1, "DPM-Solver++(2M) multistep, first order on the last step", _dpmpp_2m),
    "ipndm": SolverSpec("ipndm", 4, 1, "iPNDM: 4th-order Adams–Bashforth multistep (GITS' solver)", _ipndm, history=3),
    "unipc": SolverSpec("unipc", 3, 1, "UniPC bh2: 2nd-order multistep predictor + corrector on the next output "
                        "(diffusers' UniPCMultistep default), first order on the first and last steps", _unipc,
                        history=2, memory=_unipc_memory),
}


def _needs_table(*_args):
    raise StepsmithError("the olss solver combines the initial noise and earlier model outputs with its table's "
                         "coefficients: replay the table with sample_table(model, noise, table) (stepsmith sample "
                         "--table does), not with its sigmas alone")


# Solvers whose step needs data a table carries (OLSS coefficients): get_solver knows them (NFE, validation),
# but they are not in SOLVERS, so a sigma list alone is never sampled with them; see :func:`sample_table`.
TABLE_SOLVERS: dict[str, SolverSpec] = {
    "olss": SolverSpec("olss", 1, 1, "OLSS: fitted linear combination of x_T and earlier outputs (table only)",
                       _needs_table),
}


def get_solver(name: str) -> SolverSpec:
    spec = SOLVERS.get(name) or TABLE_SOLVERS.get(name)
    if spec is None:
        raise StepsmithError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return spec


def _refuse_table_solver(solver: str) -> None:
    if solver in TABLE_SOLVERS:
        _needs_table()


# ------------------------------------------------------------------- the integration loop


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


def evaluate(denoiser: Denoiser, x: torch.Tensor, s: float, x0_prev: torch.Tensor | None = None,
             s_prev: float | None = None, hist: tuple[torch.Tensor, ...] = ()) -> NodeState:
    """The solver state at node ``s``: one denoiser call."""
    return NodeState(x, denoiser.denoise(x, _expand(s, x)), x0_prev, s_prev, hist)


def _history(spec: SolverSpec, conv: Convention, st: NodeState, s: float) -> tuple[torch.Tensor, ...]:
    """The derivative history the next node inherits from ``st`` at ``s`` (empty for solvers without ``history``)."""
    if not spec.history:
        return ()
    new = spec.memory(conv, st, s) if spec.memory is not None else (ode_derivative(conv, st.x, s, st.x0),)
    return (*new, *st.hist)[:spec.history]


@torch.no_grad()
def integrate(denoiser: Denoiser, start: torch.Tensor | NodeState, sigmas: Sequence[float], solver: str = "euler",
              *, on_node: Callable[[int, float, NodeState], None] | None = None,
              progress: bool = False) -> torch.Tensor:
    """The one integration loop: from ``start`` at ``sigmas[0]`` down to ``sigmas[-1]`` (σ = 0).

    ``start`` is the raw state (evaluated here) or a :class:`NodeState` already evaluated at
    ``sigmas[0]`` (a search resuming a rollout mid-table). ``on_node(i, s_i, state)`` runs at
    every evaluated node before its step. ``sigmas`` are trusted (see :func:`check_sigmas`).
    Returns the final state.
    """
    spec = get_solver(solver)
    _refuse_table_solver(solver)
    conv, denoise = denoiser.convention, denoiser.denoise
    st = start if isinstance(start, NodeState) else evaluate(denoiser, start, sigmas[0])
    x = st.x
    for i in tqdm(range(len(sigmas) - 1), desc=f"sampling ({solver})", disable=not progress, leave=False):
        if i > 0:
            st = evaluate(denoiser, x, sigmas[i], st.x0, sigmas[i - 1], _history(spec, conv, st, sigmas[i - 1]))
        if on_node is not None:
            on_node(i, sigmas[i], st)
        x = spec.step(conv, denoise, st.x, st.x0, sigmas[i], sigmas[i + 1], (st.x0_prev, st.s_prev, *st.hist))
    return x


@torch.no_grad()
def sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: Sequence[float] | torch.Tensor,
           solver: str = "euler", *, progress: bool = False,
           callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate from ``noise`` (the state at ``sigmas[0]``) down to σ=0.

    ``callback(i, s_i, x_i, x0_i)`` is called at every evaluated node. Returns the final
    state (the data estimate).
    """
    get_solver(solver)
    _refuse_table_solver(solver)
    s = check_sigmas(sigmas)
    on_node = None if callback is None else (lambda i, s_i, st: callback(i, s_i, st.x, st.x0))
    return integrate(denoiser, noise, s, solver, on_node=on_node, progress=progress)


@torch.no_grad()
def sample_table(denoiser: Denoiser, noise: torch.Tensor, table, solver: str | None = None, *,
                 progress: bool = False) -> torch.Tensor:
    """Replay ``table`` (a :class:`~schedules.table.TimestepTable`) from ``noise``: its own sampler when its
    solver needs the table's data (``olss``: :func:`schedules.search.olss.olss_sample`), else :func:`sample`
    along its sigmas with ``solver`` (default: the table's)."""
    solver = solver or table.solver
    if table.solver in TABLE_SOLVERS and solver == table.solver:
        from schedules.search.olss import olss_sample

        return olss_sample(denoiser, noise, table, progress=progress)
    if solver in TABLE_SOLVERS:
        raise StepsmithError(f"solver {solver!r} replays only a table made by --method {solver} (this table is "
                             f"{table.method!r} with solver {table.solver!r}); pick another --solver", param="solver")
    return sample(denoiser, noise, table.sigmas, solver, progress=progress)


def reference_sigmas(conv: Convention, steps: int = 200) -> list[float]:
    """The convention's fine grid for the teacher (:meth:`reference_sigmas` of the convention)."""
    return conv.reference_sigmas(steps)


@torch.no_grad()
def reference_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int = 200, *,
                     progress: bool = False) -> torch.Tensor:
    """High-accuracy teacher: Heun on the convention's reference grid (2·steps-1 evaluations).

    The same teacher as :func:`schedules.teacher.teacher_sample` with ``Teacher("heun", steps)``.
    """
    from schedules.teacher import Teacher, teacher_sample

    return teacher_sample(denoiser, noise, Teacher("heun", steps), progress=progress).x
