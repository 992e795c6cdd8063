"""Align Your Steps (Sabour, Fidler & Kreis, ICML 2024): the optimizer itself, not just its tables.

Objective: the KL-divergence upper bound (KLUB, via Girsanov) between the true reverse SDE and
its discretisation on the schedule t_0 > t_1 > ... (EDM sigmas). For the first-order
(DDIM/Euler) discretisation the per-interval term is

    KLUB_i = ∫_{t_{i+1}}^{t_i} (1/t³) · E_{x0, ε} ‖D(x0 + t·ε, t) − D(x0 + t_i·ε, t_i)‖² dt,

estimated by Monte Carlo with the model's denoiser D and *importance sampling in t* from
q(t) ∝ 1/t³ on the interval (inverse CDF), so the estimate is Z_i · mean ‖·‖², Z_i = ∫ t⁻³ dt.
The state at t inside the interval is drawn from the Brownian bridge between x0 and
x_{t_i} = x0 + t_i·ε (the SDE's own coupling). Common random numbers (the same x0, ε, ξ and
quantiles for every candidate) make the comparison of candidates low-variance.

Optimisation (as in the paper): coordinate-wise over interior points — for each t_i try
``candidates`` values log-spaced strictly between its neighbours, keep the argmin of the two
adjacent KLUB terms, sweep until the schedule is stable; after every sweep a *sample metric*
(final-sample error against the teacher on the search samples) is measured and the search
stops early once it no longer improves, returning the best schedule by that metric.
Hierarchical: for K above ``base`` steps, optimise ``base`` steps, subdivide at log-midpoints,
optimise only the new points, repeat, and reach K by log-linear interpolation.

Data samples x0 for the KLUB: AYS needs samples of the data distribution; stepsmith uses the
**teacher's outputs** (reference Heun sampler on the search noises), so no dataset is needed.
Every model is handled in EDM sigma through its convention's ``to_edm`` / ``from_edm`` (flow:
t = σ/(1-σ), σ = 1 ↔ t = ∞, where q(t) ∝ t⁻³ is still proper; the teacher is
:mod:`schedules.teacher`'s Heun on the convention's reference grid). The last evaluated node is
optimised too and the final jump goes straight to 0 (``last="zero"``, the default for every
model, as ComfyUI's and diffusers' AYS lists end): pinning it at σ_min (the paper's optimiser,
``last="sigma_min"``) spends one of K evaluations on a node whose output is nearly the input.
Measured on builtin:digits-ddpm (DDIM, FID of 512 held-out samples): the NFE-4 table pinned at
σ_min evaluates timesteps [999, 634, 24, 0] and scores 1692; with ``last="zero"`` 524 (NFE 6:
425.6 → 322.0). On flow models the default was already ``"zero"``.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from schedules.baselines import ays_closed_form_nodes, loglinear_interp, steps_for, table_from_nodes
from schedules.conditioning import bind
from schedules.io import StepsmithError
from schedules.search.common import check_finite, final_mse_kind, mse, rollout
from schedules.teacher import Teacher, teacher_sample


class KLUB:
    """Monte Carlo KLUB estimator with fixed data samples, noises and quantiles."""

    def __init__(self, denoiser, x0: torch.Tensor, draws: int = 2, seed: int = 0):
        self.den = denoiser
        self.conv = denoiser.convention
        g = torch.Generator().manual_seed(seed + 1)
        self.x0 = x0
        self.eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        self.u = torch.rand((draws, x0.shape[0]), generator=g, dtype=torch.float64)
        self.xi = torch.randn((draws, *x0.shape), generator=g, dtype=x0.dtype)
        self.draws = draws
        self._anchor: dict[float, torch.Tensor] = {}
        self.calls = 0

    def _state(self, t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-space state at EDM sigma t (per sample) for data x0 and noise ε, and its native sigma."""
        s = self.conv.from_edm(t)
        view = (-1,) + (1,) * (x0.ndim - 1)
        return self.conv.add_noise(x0, eps, s.view(view).to(x0.dtype)), s

    @torch.no_grad()
    def _d(self, t: torch.Tensor, x0, eps) -> torch.Tensor:
        x, s = self._state(t, x0, eps)
        self.calls += 1
        out = self.den.denoise(x, s.to(x.dtype))
        check_finite(out, "the KLUB estimate")
        return out.to(torch.float64)

    def anchor(self, t_hi: float) -> torch.Tensor:
        if t_hi not in self._anchor:
            B = self.x0.shape[0]
            self._anchor[t_hi] = self._d(torch.full((B,), t_hi, dtype=torch.float64), self.x0, self.eps)
        return self._anchor[t_hi]

    @torch.no_grad()
    def interval(self, t_lo: float, t_hi: float) -> float:
        """KLUB term of the step from t_hi (D frozen there) down to t_lo."""
        if not t_hi > t_lo > 0:
            raise StepsmithError(f"KLUB interval needs t_hi > t_lo > 0, got ({t_lo}, {t_hi})")
        a2, b2 = t_lo ** -2, (0.0 if math.isinf(t_hi) else t_hi ** -2)
        Z = (a2 - b2) / 2
        t = (a2 - self.u * (a2 - b2)) ** -0.5  # [draws, B], q(t) ∝ t^-3 on [t_lo, t_hi]
        B = self.x0.shape[0]
        # Brownian coupling of the SDE: x_t given x0 and x_{t_hi} = x0 + t_hi·ε is a Brownian bridge,
        # x_t = x0 + t·(r·ε + sqrt(1-r²)·ξ) with r = t / t_hi (r = 0 when t_hi = ∞).
        r = torch.zeros_like(t) if math.isinf(t_hi) else t / t_hi
        view = (self.draws, B) + (1,) * (self.x0.ndim - 1)
        rv = r.view(view).to(self.x0.dtype)
        eps = (rv * self.eps[None] + (1 - rv**2).clamp_min(0).sqrt() * self.xi).reshape(-1, *self.x0.shape[1:])
        x0 = self.x0.repeat(self.draws, *([1] * (self.x0.ndim - 1)))
        with bind(torch.arange(B).repeat(self.draws)):  # draw-major: the B samples once per draw
            d = self._d(t.reshape(-1), x0, eps).reshape(self.draws, B, -1)
        ref = self.anchor(t_hi).reshape(1, B, -1)
        return float(Z * ((d - ref) ** 2).sum(-1).mean())

    def total(self, ts: list[float]) -> float:
        return sum(self.interval(ts[i + 1], ts[i]) for i in range(len(ts) - 1))


def _log_candidates(lo: float, hi: float, n: int) -> list[float]:
    """n points strictly between lo and hi, log-spaced (hi may be ∞: then spaced in atan)."""
    if math.isinf(hi):
        a, b = math.atan(lo), math.pi / 2
        return [math.tan(a + (b - a) * (k + 1) / (n + 1)) for k in range(n)]
    la, lb = math.log(lo), math.log(hi)
    return [math.exp(la + (lb - la) * (k + 1) / (n + 1)) for k in range(n)]


def coordinate_descent(klub: KLUB, ts: list[float], free: list[int], *, candidates: int = 11, max_sweeps: int = 6,
                       metric=None, progress: bool = False) -> tuple[list[float], dict]:
    """Coordinate-wise KLUB minimisation over the indices ``free`` of the descending EDM schedule ``ts``.

    ``metric(ts) -> float`` (lower is better) is measured after every sweep; the search stops when it
    stops improving and returns the best schedule by the metric (early stopping, as in the paper).
    """
    ts = list(ts)
    history = []
    best_ts, best_m = list(ts), (metric(ts) if metric else None)
    history.append({"sweep": 0, "metric": best_m, "klub": None})
    for sweep in tqdm(range(1, max_sweeps + 1), desc="ays", disable=not progress, leave=False):
        moved = False
        for i in free:
            hi, lo = ts[i - 1], ts[i + 1]
            cands = _log_candidates(lo, hi, candidates) + [ts[i]]
            vals = [klub.interval(lo, c) + klub.interval(c, hi) for c in cands]
            j = min(range(len(cands)), key=lambda k: vals[k])
            if cands[j] != ts[i] and vals[j] < vals[-1]:
                ts[i] = cands[j]
                moved = True
        m = metric(ts) if metric else None
        history.append({"sweep": sweep, "metric": m, "moved": moved})
        if metric is not None:
            if m < best_m:
                best_ts, best_m = list(ts), m
            else:
                break
        else:
            best_ts = list(ts)
        if not moved:
            break
    return best_ts, {"history": history, "best_metric": best_m}


def subdivide(ts: list[float]) -> tuple[list[float], list[int]]:
    """Insert log-midpoints between consecutive finite nodes; returns (schedule, indices of new points)."""
    out, new = [ts[0]], []
    for i in range(1, len(ts)):
        a, b = out[-1], ts[i]
        mid = math.sqrt(a * b) if math.isfinite(a) else b * 4.0
        out.append(mid)
        new.append(len(out) - 1)
        out.append(b)
    return out, new


def _hierarchical(klub: KLUB, smin: float, smax: float, n_pts: int, data_std: float, *, base: int, candidates: int,
                 max_sweeps: int, metric, progress: bool) -> tuple[list[float], dict]:
    """``n_pts`` descending EDM points from smax to smin: optimise ``base`` of them (stopping early on ``metric``
    when that already is the whole schedule), subdivide at log-midpoints and optimise the new points, repeat,
    and reach ``n_pts`` by log-linear interpolation."""
    if n_pts < 3:  # nothing interior to optimise
        return ([smax, smin] if n_pts == 2 else [smax]), {"history": [], "best_metric": None}
    m0 = min(n_pts, base)
    ts = ays_closed_form_nodes(smin, smax, m0, data_std)
    ts, info = coordinate_descent(klub, ts, list(range(1, m0 - 1)), candidates=candidates, max_sweeps=max_sweeps,
                                  metric=metric if m0 == n_pts else None, progress=progress)
    while len(ts) < n_pts:
        ts2, new = subdivide(ts)
        new = [i for i in new if 0 < i < len(ts2) - 1]
        if len(ts2) > 2 * n_pts:
            break
        ts, info = coordinate_descent(klub, ts2, new, candidates=candidates, max_sweeps=max_sweeps, metric=None,
                                      progress=progress)
    if len(ts) != n_pts:
        finite = [v for v in ts if math.isfinite(v)]
        inner = loglinear_interp(finite, n_pts - (len(ts) - len(finite)))
        ts = ([math.inf] if len(finite) < len(ts) else []) + inner
    return ts, info


def ays_table(adapter, nfe: int, solver: str = "euler", *, samples: int = 64, seed: int = 0, progress: bool = False,
              draws: int = 2, candidates: int = 11, max_sweeps: int = 6, base: int = 10, last: str | None = None,
              early_stop: bool = True, teacher_steps: int = 100, data_std: float | None = None):
    """Align-Your-Steps optimisation for ``make_table(method="ays")``.

    ``last`` (default ``"zero"``; ``"sigma_min"`` is the paper's pinned end point) says whether the last
    evaluated node is optimised with a final jump straight to 0 or pinned at σ_min.
    """
    conv = adapter.convention
    K = steps_for(adapter, nfe, solver)
    last = last or "zero"
    if last not in ("sigma_min", "zero"):
        raise StepsmithError(f"ays option last must be 'sigma_min' or 'zero', got {last!r}")
    t0 = time.perf_counter()
    noise = adapter.noise(samples, seed)
    teacher = Teacher("heun", teacher_steps)
    target = teacher_sample(adapter, noise, teacher, batch_size=16).x
    check_finite(target, "the reference trajectory")
    t_ref = time.perf_counter() - t0
    calls_ref = adapter.calls
    x0 = target.to(torch.float64).to(noise.dtype)
    sd = float(data_std if data_std is not None else x0.std())
    klub = KLUB(adapter, x0, draws=draws, seed=seed)
    lo, hi = conv.sampling_range()
    n_pts = K if last == "sigma_min" else K + 1  # K evaluated nodes (+ the σ_min end point when last == "zero")

    def to_sigmas(ts: list[float]) -> list[float]:
        nodes = conv.from_edm(torch.tensor(ts, dtype=torch.float64)).tolist()
        return table_from_nodes(adapter, nodes if last == "sigma_min" else nodes[:-1], solver, "ays").sigmas

    def metric(ts: list[float]) -> float:
        return mse(rollout(adapter, solver, to_sigmas(ts), x=noise), target)

    ts, info = _hierarchical(klub, lo, conv.to_edm(hi), n_pts, sd, base=base, candidates=candidates,
                             max_sweeps=max_sweeps, metric=metric if early_stop else None, progress=progress)
    objective = metric(ts)
    prov = {"klub_draws": draws, "candidates": candidates, "base": base, "last": last, "data_std": sd,
            "x0_source": f"teacher outputs ({teacher.name}) on the search noises", "teacher": teacher.describe(),
            "klub": klub.total(ts), "history": info.get("history"), "reference_seconds": round(t_ref, 3),
            "reference_calls": calls_ref, "objective_kind": final_mse_kind(teacher),
            "edm_schedule": [None if math.isinf(v) else v for v in ts]}
    nodes = conv.from_edm(torch.tensor(ts[:K], dtype=torch.float64)).tolist()
    t = table_from_nodes(adapter, nodes, solver, "ays", provenance=prov)
    t.objective = float(objective)
    return t
