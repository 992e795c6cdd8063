"""Align Your Steps (Sabour, Fidler & Kreis, ICML 2024), as published: the optimizer itself, not just its tables.

Objective: the KL-divergence upper bound (KLUB, via Girsanov) between the true reverse SDE and
its discretisation on the schedule t_0 > t_1 > ... (EDM sigmas) with the denoiser frozen at each
interval's start. For the first-order (DDIM/Euler) discretisation the per-interval term is

    KLUB_i = ∫_{t_{i+1}}^{t_i} (1/t³) · E_{x0, ε} ‖D(x_t, t) − D(x_{t_i}, t_i)‖² dt,

with x0 a **data sample**, x_t = x0 + t·n and x_{t_i} = x_t + sqrt(t_i² − t²)·n' (noised further).
Here the same joint law is drawn the other way round — x_{t_i} = x0 + t_i·ε once per interval
start (one cached evaluation), x_t from the Brownian bridge between x0 and x_{t_i} — which is
identical in distribution and lets every candidate share its anchor evaluations.

Importance sampling in t uses the Gaussian-data closed form with a constant c (0.5 in the paper):
t is drawn from q(t) ∝ t⁻³·g(t), g(t) = 1/(t²+c²) − 1/(t_i²+c²) (inverse CDF of the closed-form
antiderivative, by bisection), and each squared difference is divided by g(t), so the estimate is
Z_i · mean(‖ΔD‖² / g), Z_i = ∫ t⁻³ g dt. For data N(0, c²I) the ratio has mean exactly
c⁴·dim, so the estimator has low variance where the data look Gaussian. Common random numbers
(the same x0, ε, ξ and quantiles for every candidate) make candidates comparable.

Theorem 3.1's closed form (t_i = c·tan of a uniform grid in atan(t/c)) is *not* the KLUB's optimum: for
data N(0, c²) it minimises the deterministic Euler/DDIM output error (:class:`GaussianODEError`: each step
shrinks the sample std by cos Δθ_i, t = c·tan θ), while the KLUB's 1/t³ weight pulls interior points far
lower (c = 0.5, t ∈ [0.002, 80], 3 steps: KLUB optimum t = [0.080, 0.013], closed form [0.860, 0.289]).
Both are checked in tests/test_search_ays.py; the search optimises the KLUB, as the paper does.

Optimisation (as in the paper): coordinate-wise over interior points, 11 candidates per point
log-spaced strictly between its neighbours plus the current value (so the bound never
increases); at the ``base`` stage (11 points: 10 steps) a *sample metric* is measured after every sweep —
the search objective of :mod:`schedules.search.objectives` (``auto``: feature-mse on embedded models, else
teacher-mse) against the teacher's samples on the search noises — and the search stops early once it no
longer improves, returning the best schedule by that metric (the bound's optimum is not the output's).
Then subdivide 10 → 20 → 40 at log-midpoints optimising only the new points, and reach every step count
by log-linear interpolation of the 40-step list (``small="direct"`` optimises counts below ``base``
directly instead, with the same early stopping). :func:`ays_tables` serves several budgets from one
search. Initialisation (``init``): time-uniform for discrete (VP) models, as the paper; for flow models
the paper's EDM ρ = 7 (``rho7``) and uniform in σ (``uniform``, diffusers' FlowMatch default) were
measured and ``auto`` is uniform in σ: on builtin:digits-flow (Euler, 32 search samples, seed 0, bench options
draws 1 / candidates 9 / max_sweeps 3 / teacher_steps 50) the 10-step stage's feature-mse against the teacher
is 0.450 from uniform-in-σ and 5.56 from ρ = 7 (and the first KLUB sweep raised both: 0.468, 6.71, so early
stopping kept the initial schedule).

Measured (search: 32 samples, seed 0, the bench options above, one search for all four budgets; held-out FID
on digits-features, N = 500, seed 10 000; uniform / karras / trailing are the committed BENCHMARKS.md rows):

    NFE                       4      6      8      10
    digits-flow Euler   ays   253.6  151.6  120.4  104.9   (uniform = trailing 255.5 155.4 124.5 104.1)
    digits-ddpm DDIM    ays   283.7  149.0  105.9   84.5   (uniform 440 184 117.4 90.4; trailing 285.4 147.8 105.9 84.0)
    digits-ddpm DPM++2M ays   256.4   75.0   52.2   47.7   (uniform 530.9 694.4 216.1 111.5; karras 977.8 135.3 115.8 83.7)
    (DPM++2M from ρ = 7 instead: 788.1 82.5 62.1 60.1 — the paper's time-uniform init for discrete models holds.)

On all three the first KLUB sweep at the 10-step stage raised the sample metric (flow 0.450 → 0.468, DDIM
0.820 → 0.924, DPM++ 0.691 → 1.114), so early stopping returned the initial schedule: the gain over
``uniform`` here comes from the initialisation with the σ_min node replaced by 0 (time-uniform ending in a jump
to 0, i.e. diffusers' "trailing" spacing), not from the KLUB moves.

Final point (``last="zero"``, default): the schedule is optimised with K+1 points ending at σ_min,
and the σ_min point is replaced by 0 — K evaluations at the first K points, then the final jump
to 0 (what ComfyUI and diffusers' ``AysSchedules`` do with the published lists). ``last="sigma_min"``
keeps the published lists' last *evaluated* node at σ_min (one of K evaluations spent there).

Data: ``data`` (a tensor [N, ...] or a path to a safetensors file / folder of PNGs); the embedded
digits / toy2d models default to their own training data. Without data the teacher's outputs
(reference Heun sampler on the search noises) stand in as a labelled fallback (``x0="teacher"``, or
automatically when no data is known; recorded in the provenance as ``x0_source``).
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from schedules.baselines import loglinear_interp, steps_for, table_from_nodes
from schedules.conditioning import bind
from schedules.conventions import karras_sigmas
from schedules.embedded import embedded_data
from schedules.io import StepsmithError, check_sample_tensor, load_samples
from schedules.search.common import check_finite, rollout
from schedules.search.objectives import feature_name, make_scorer, objective_kind, resolve_objective
from schedules.search.resume import checkpoint_key, open_checkpoint, tensor_key
from schedules.teacher import Teacher, teacher_sample

KLUB_TOY2D_POINTS = 8192  # fresh two-moons points the KLUB pairs of toy2d are drawn from (seed 0)


def _gauss_antiderivative(t: torch.Tensor, c: float, t_hi: float) -> torch.Tensor:
    """F(t) with F' = t⁻³·(1/(t²+c²) − 1/(t_hi²+c²)) and F(∞) = 0 (partial fractions)."""
    c2 = c * c
    b = 0.0 if math.isinf(t_hi) else 1.0 / (t_hi * t_hi + c2)
    inv2 = t ** -2
    return (torch.log1p(c2 * inv2) / c2 - inv2) / (2 * c2) + b * inv2 / 2


def gaussian_factor(t: torch.Tensor, c: float, t_hi: float) -> torch.Tensor:
    """g(t) = 1/(t²+c²) − 1/(t_hi²+c²), written without cancellation near t_hi."""
    if math.isinf(t_hi):
        return 1.0 / (t * t + c * c)
    return (t_hi * t_hi - t * t) / ((t * t + c * c) * (t_hi * t_hi + c * c))


def sample_t(u: torch.Tensor, t_lo: float, t_hi: float, c: float) -> tuple[torch.Tensor, float]:
    """Quantiles ``u`` ∈ [0, 1) → t ~ q(t) ∝ t⁻³·g(t) on [t_lo, t_hi] (bisection in log t), and Z = ∫ t⁻³ g dt."""
    lo_t = torch.tensor(t_lo, dtype=torch.float64)
    F_lo = float(_gauss_antiderivative(lo_t, c, t_hi))
    F_hi = 0.0 if math.isinf(t_hi) else float(_gauss_antiderivative(torch.tensor(t_hi, dtype=torch.float64), c, t_hi))
    Z = F_hi - F_lo
    target = F_lo + u.to(torch.float64) * Z
    a = torch.full_like(target, math.log(t_lo))
    top = math.log(t_hi) if math.isfinite(t_hi) else math.log(max(t_lo, c) * 1e6)
    b = torch.full_like(target, top)
    for _ in range(60):
        m = (a + b) / 2
        below = _gauss_antiderivative(m.exp(), c, t_hi) < target
        a, b = torch.where(below, m, a), torch.where(below, b, m)
    return ((a + b) / 2).exp(), Z


class KLUB:
    """Monte Carlo KLUB estimator with fixed data samples, noises and quantiles (importance constant ``c``)."""

    def __init__(self, denoiser, x0: torch.Tensor, draws: int = 2, seed: int = 0, c: float = 0.5):
        if not c > 0:
            raise StepsmithError(f"ays option c (the importance-sampling constant) must be > 0, got {c}", param="c")
        self.den = denoiser
        self.conv = denoiser.convention
        self.c = float(c)
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
        t, Z = sample_t(self.u, t_lo, t_hi, self.c)  # [draws, B]
        w = 1.0 / gaussian_factor(t, self.c, t_hi)
        B = self.x0.shape[0]
        # x_t given x0 and x_{t_hi} = x0 + t_hi·ε is a Brownian bridge: x_t = x0 + t·(r·ε + sqrt(1-r²)·ξ), r = t/t_hi
        r = torch.zeros_like(t) if math.isinf(t_hi) else t / t_hi
        view = (self.draws, B) + (1,) * (self.x0.ndim - 1)
        rv = r.view(view).to(self.x0.dtype)
        eps = (rv * self.eps[None] + (1 - rv**2).clamp_min(0).sqrt() * self.xi).reshape(-1, *self.x0.shape[1:])
        x0 = self.x0.repeat(self.draws, *([1] * (self.x0.ndim - 1)))
        with bind(torch.arange(B).repeat(self.draws)):  # draw-major: the B samples once per draw
            d = self._d(t.reshape(-1), x0, eps).reshape(self.draws, B, -1)
        ref = self.anchor(t_hi).reshape(1, B, -1)
        return float(Z * (((d - ref) ** 2).sum(-1) * w).mean())

    def total(self, ts: list[float]) -> float:
        return sum(self.interval(ts[i + 1], ts[i]) for i in range(len(ts) - 1))


class GaussianODEError:
    """The quantity behind the paper's Theorem 3.1 (the closed form for data N(0, c²I)), as a per-interval cost.

    With the ideal denoiser D(x, t) = c²/(c²+t²)·x, one Euler/DDIM step t_i → t_{i+1} maps x to
    x·(c² + t_i·t_{i+1})/(c² + t_i²) while the exact ODE maps it to x·sqrt((c²+t_{i+1}²)/(c²+t_i²)). Writing
    t = c·tan θ, their ratio is cos(θ_i − θ_{i+1}), so the sampler's final std is the true one times
    Π_i cos Δθ_i and KL(output ‖ data) is a decreasing function of that product. Minimising
    Σ_i −log cos Δθ_i with Σ Δθ_i fixed gives equal Δθ_i: t_i = c·tan of a uniform grid in atan(t/c), the closed
    form of :func:`schedules.baselines.ays_closed_form_nodes`. (The KLUB with the SDE's 1/t³ weight has a different
    optimum, with the interior points much lower; checked numerically in tests/test_search_ays.py.)
    ``interval(lo, hi)`` has KLUB's interface, so :func:`coordinate_descent` optimises either.
    """

    def __init__(self, c: float = 0.5):
        if not c > 0:
            raise StepsmithError(f"the Gaussian data std c must be > 0, got {c}", param="c")
        self.c = float(c)

    def theta(self, t: float) -> float:
        return math.pi / 2 if math.isinf(t) else math.atan(t / self.c)

    def interval(self, t_lo: float, t_hi: float) -> float:
        if not t_hi > t_lo > 0:
            raise StepsmithError(f"interval needs t_hi > t_lo > 0, got ({t_lo}, {t_hi})")
        return -math.log(math.cos(self.theta(t_hi) - self.theta(t_lo)))

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
                       metric=None, progress: bool = False, resume: dict | None = None,
                       on_step=None) -> tuple[list[float], dict]:
    """Coordinate-wise KLUB minimisation over the indices ``free`` of the descending EDM schedule ``ts``.

    ``metric(ts) -> float`` (lower is better) is measured after every sweep; the search stops when it
    stops improving and returns the best schedule by the metric (early stopping, as in the paper).
    ``on_step(state)`` is called after every point and every sweep with the search's whole state; passed back
    as ``resume``, the search goes on exactly from there (the KLUB's estimates are fixed by its seed, so the
    same candidates get the same values; a state marked ``done`` returns its result at once).
    """
    if resume is not None:
        ts, best_ts, best_m = list(resume["ts"]), list(resume["best_ts"]), resume["best_m"]
        history, first, pos, moved = list(resume["history"]), int(resume["sweep"]), int(resume["pos"]), resume["moved"]
        if resume.get("done"):
            return best_ts, {"history": history, "best_metric": best_m}
    else:
        ts = list(ts)
        best_ts, best_m = list(ts), (metric(ts) if metric else None)
        history, first, pos, moved = [{"sweep": 0, "metric": best_m, "klub": None}], 1, 0, False

    def state(sweep: int, p: int, moved: bool, done: bool = False) -> dict:
        return {"ts": list(ts), "best_ts": list(best_ts), "best_m": best_m, "history": list(history), "sweep": sweep,
                "pos": p, "moved": moved, "done": done}

    for sweep in tqdm(range(first, max_sweeps + 1), desc="ays", disable=not progress, leave=False):
        if sweep > first or resume is None:
            moved, pos = False, 0
        for p in range(pos, len(free)):
            i = free[p]
            hi, lo = ts[i - 1], ts[i + 1]
            cands = _log_candidates(lo, hi, candidates) + [ts[i]]
            vals = [klub.interval(lo, c) + klub.interval(c, hi) for c in cands]
            j = min(range(len(cands)), key=lambda k: vals[k])
            if cands[j] != ts[i] and vals[j] < vals[-1]:
                ts[i] = cands[j]
                moved = True
            if on_step is not None:
                on_step(state(sweep, p + 1, moved))
        m = metric(ts) if metric else None
        history.append({"sweep": sweep, "metric": m, "moved": moved})
        stop = not moved
        if metric is not None:
            if m < best_m:
                best_ts, best_m = list(ts), m
            else:
                stop = True
        else:
            best_ts = list(ts)
        if on_step is not None:
            on_step(state(sweep + 1, 0, False, done=stop or sweep == max_sweeps))  # the next sweep starts unmoved
        if stop:
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


def _to_count(ts: list[float], n_pts: int, conv=None) -> list[float]:
    """Log-linear interpolation (over the index) of a descending EDM list to ``n_pts`` points, in log of the
    convention's native σ when given (flow: σ = 1 on top is EDM ∞, whose log the paper's rule cannot use; keeping
    ∞ fixed and interpolating the rest would pin the second node at the 40-step list's second, σ ≈ 0.97)."""
    if len(ts) == n_pts:
        return list(ts)
    if conv is not None:
        native = conv.from_edm(torch.tensor(ts, dtype=torch.float64)).tolist()
        return conv.to_edm(torch.tensor(loglinear_interp(native, n_pts), dtype=torch.float64)).tolist()
    finite = [v for v in ts if math.isfinite(v)]
    inner = loglinear_interp(finite, n_pts - (len(ts) - len(finite)))
    return ([math.inf] if len(finite) < len(ts) else []) + inner


def _hierarchical(klub: KLUB, init, n_pts: int | None, *, base: int, candidates: int, max_sweeps: int, metric,
                 progress: bool, levels: int = 2, small: str = "interp", run: dict | None = None,
                 save=None) -> tuple[list[float], dict]:
    """``n_pts`` descending EDM points (``init(n)`` gives the starting n), as the paper: optimise ``base`` points
    (10 steps) with early stopping on ``metric``, subdivide ``levels`` times at log-midpoints (10 → 20 → 40)
    optimising only the new points (more levels while fewer than ``n_pts``), and reach ``n_pts`` by log-linear
    interpolation (``n_pts=None``: the finest list itself). ``small="direct"`` optimises a count at most ``base``
    directly instead (with early stopping).

    ``run`` (a dict this function fills in) is the search's progress — the stage reached, the schedule it starts
    from, the running coordinate descent's state — and ``save()`` is called whenever it changes; passed back
    with a resumed search's ``run``, the search goes on exactly where it stopped."""
    if n_pts is not None and n_pts < 3:  # nothing interior to optimise
        return init(n_pts), {"history": [], "best_metric": None}
    run = {} if run is None else run

    def on_step(state: dict) -> None:
        run["cd"] = state
        save()

    def descend(ts: list[float], free: list[int], metric_fn):
        return coordinate_descent(klub, ts, free, candidates=candidates, max_sweeps=max_sweeps, metric=metric_fn,
                                  progress=progress, resume=run.get("cd"), on_step=on_step if save else None)

    m0 = n_pts if (n_pts is not None and small == "direct" and n_pts <= base) else base
    if run.get("stage", 0) == 0:
        ts, stage = descend(init(m0), list(range(1, m0 - 1)), metric)
        run.update(stage=1, ts=ts, stage0=stage, cd=None)
        if save:
            save()
    ts, stage = list(run["ts"]), run["stage0"]
    if m0 == n_pts:
        return ts, stage
    level = run["stage"] - 1
    while level < levels or len(ts) < (n_pts or 0):
        ts, new = subdivide(ts)
        ts, _ = descend(ts, [i for i in new if 0 < i < len(ts) - 1], None)
        level += 1
        run.update(stage=level + 1, ts=ts, cd=None)
        if save:
            save()
    return (ts if n_pts is None else _to_count(ts, n_pts)), stage


INITS = ("auto", "uniform", "rho7")


def init_kind(init: str = "auto") -> str:
    """What ``init="auto"`` stands for: time-uniform for discrete (VP) models, as the paper; for continuous-time
    (flow) models uniform in σ, the measured better of the two (see the module docstring)."""
    if init not in INITS:
        raise StepsmithError(f"ays option init must be one of {', '.join(INITS)}, got {init!r}", param="init")
    return "uniform" if init == "auto" else init


def init_nodes(adapter, n: int, init: str = "auto") -> list[float]:
    """The starting n EDM points (descending, σ_max … σ_min): ``uniform`` is uniform in the model's time (VP:
    timesteps T-1 … 0; flow: σ uniform from 1 to 0, the end point at σ_min), ``rho7`` is EDM ρ = 7 on the model's own σ range (flow: σ = 1
    on top, i.e. EDM ∞, as the ``karras`` baseline)."""
    conv = adapter.convention
    T = conv.discrete_timesteps
    kind = init_kind(init)
    if kind == "uniform" and T is None:
        lo, hi = conv.sampling_range()
        if n == 1:
            return conv.to_edm(torch.tensor([hi], dtype=torch.float64)).tolist()
        # time-uniform from σ_max down to 0, the end point kept at σ_min (log-space subdivision and interpolation
        # need it finite): with the last point replaced by 0 the evaluated nodes are the uniform baseline's
        native = torch.linspace(hi, 0.0, n, dtype=torch.float64)
        native[-1] = lo
        return conv.to_edm(native).tolist()
    if kind == "uniform":
        if n == 1:
            return [conv.sigma_max]
        t = torch.linspace(T - 1, 0, n, dtype=torch.float64)
        native = conv.sigma_from_model_time(t)
    else:
        lo, hi = conv.sampling_range()
        native = torch.tensor(karras_sigmas(lo, hi, n, 7.0) if n > 1 else [hi], dtype=torch.float64)
    return conv.to_edm(native).tolist()


def load_data(path: str | Path, shape: tuple[int, ...] | None = None, min_count: int | None = None) -> torch.Tensor:
    """Data samples from a safetensors file (one tensor [N, ...], or exactly one named images/samples/x/data/real)
    or a folder of PNG/JPEG images (scaled to [-1, 1], resized to ``shape``): :func:`schedules.io.load_samples`."""
    return load_samples(path, shape=shape, min_count=min_count, param="data", asked_by="the search")


def data_samples(adapter, data, samples: int, seed: int, required: bool = True) -> tuple[torch.Tensor | None, str | None]:
    """``samples`` data samples x0 for the KLUB (a random subset, by ``seed``) and where they came from
    ((None, None) when there is no data and it is not ``required``)."""
    shape = tuple(adapter.sample_shape)
    if isinstance(data, (str, Path)):
        x, src = load_data(data, shape, samples), f"data file {data}"
    elif isinstance(data, torch.Tensor):
        x, src = data, "data tensor"
    else:
        found = embedded_data(getattr(adapter, "name", None), KLUB_TOY2D_POINTS, 0)
        if found is None:
            if not required:
                return None, None
            raise StepsmithError(f"ays needs data samples for {getattr(adapter, 'name', 'this model')}: pass --data PATH "
                                 "(a .safetensors tensor [N, ...] or a folder of PNG/JPEG images), or the labelled "
                                 "fallback --option x0=teacher", param="data")
        x, src = found
    x = check_sample_tensor(x, shape=shape, min_count=samples, param="data", asked_by="the search")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    return x[idx].float(), f"{src}: {samples} of {x.shape[0]} samples"


def ays_table(adapter, nfe: int, solver: str = "euler", **options):
    """Align-Your-Steps optimisation for ``make_table(method="ays")``; the options are :func:`ays_tables`'s."""
    return ays_tables(adapter, [nfe], solver, **options)[0]


AYS_FALLBACK_WARNING = ("no data samples for the KLUB: it used the teacher's own outputs as x0 (recorded as x0_source); "
                        "give data (--data FILE.safetensors|IMAGE_DIR) for Align Your Steps as published")


def ays_tables(adapter, nfes: list[int], solver: str = "euler", *, samples: int = 64, seed: int = 0, progress: bool = False,
               draws: int = 2, candidates: int = 11, max_sweeps: int = 6, base: int = 11, last: str = "zero",
               early_stop: bool = True, teacher_steps: int = 100, c: float = 0.5, x0: str = "auto",
               data: torch.Tensor | str | None = None, init: str = "auto", objective: str | None = None, features=None,
               levels: int = 2, small: str = "interp", checkpoint: str | None = None):
    """Align-Your-Steps tables for each budget in ``nfes`` from one optimisation (the 40-step list is shared; only
    ``small="direct"`` counts below ``base`` are optimised on their own).

    ``last="zero"`` (default) replaces the σ_min end point by 0 so every one of the K evaluations counts;
    ``"sigma_min"`` evaluates the last node at σ_min as the published lists do. ``x0`` picks the KLUB's data
    samples: ``"data"`` (``data``, or an embedded model's own data set), ``"teacher"`` (the teacher's outputs on
    the search noises), or ``"auto"`` (data when there is any, else the teacher fallback, labelled in ``x0_source``).
    ``init``: ``auto`` | ``uniform`` | ``rho7`` (:func:`init_nodes`). ``objective`` / ``features``: the early-stopping
    sample metric against the teacher on the search noises (default ``auto``: feature-mse on embedded models).
    ``base`` points (11: the paper's 10 steps) are optimised first, then ``levels`` subdivisions.
    ``checkpoint`` (a file path; None: none) saves the search as it goes and resumes it: the teacher's samples
    after the reference pass, the coordinate descent after every point and sweep, each finished stage; a resumed
    search ends with exactly the uninterrupted tables (the KLUB's estimates are fixed by its seed). Its cached
    anchor evaluations (one latent per sample and node or candidate: too large to keep) are the only work done
    twice, at most one per node and candidate of the level it resumes in (:mod:`schedules.search.resume`).
    """
    conv = adapter.convention
    if last not in ("sigma_min", "zero"):
        raise StepsmithError(f"ays option last must be 'sigma_min' or 'zero', got {last!r}", param="last")
    if x0 not in ("auto", "data", "teacher"):
        raise StepsmithError(f"ays option x0 must be 'auto', 'data' or 'teacher', got {x0!r}", param="x0")
    if x0 == "teacher" and data is not None:
        raise StepsmithError("ays option x0=teacher ignores --data; drop one of them", param="x0")
    if candidates < 1 or base < 3:
        raise StepsmithError(f"ays needs candidates >= 1 and base >= 3, got {candidates} and {base}", param="base")
    if small not in ("interp", "direct") or levels < 0:
        raise StepsmithError(f"ays options: small must be 'interp' or 'direct' and levels >= 0, got {small!r}, {levels}",
                             param="small")
    init_name = init_kind(init)
    objective_name = resolve_objective(objective, getattr(adapter, "name", None), features)
    x_data, data_src = (None, None) if x0 == "teacher" else data_samples(adapter, data, samples, seed, x0 == "data")
    fname = feature_name(objective_name, getattr(adapter, "name", None), features, check_data=False)
    key = checkpoint_key(adapter, method="ays", nfe=list(nfes), solver=solver, samples=samples, seed=seed, draws=draws,
                         candidates=candidates, max_sweeps=max_sweeps, base=base, last=last, early_stop=early_stop,
                         teacher_steps=teacher_steps, c=c, x0=x0, data=None if x_data is None else tensor_key(x_data),
                         init=init_name, objective=objective_name, features=fname, levels=levels, small=small)
    ck = open_checkpoint(checkpoint, "ays", key, adapter)
    t0 = time.perf_counter()
    noise = adapter.noise(samples, seed)
    teacher = Teacher("heun", teacher_steps)
    if "reference" in ck.state:
        ref = ck.state["reference"]
        target, t_ref, calls_ref = ref["target"], ref["seconds"], ref["calls"]
    else:
        target = teacher_sample(adapter, noise, teacher, batch_size=16).x
        check_finite(target, "the reference trajectory")
        t_ref = time.perf_counter() - t0
        calls_ref = adapter.calls
        ck.state["reference"] = {"target": target, "seconds": t_ref, "calls": calls_ref}
        ck.save()
    score, oprov = make_scorer(objective_name, target, model_name=getattr(adapter, "name", None), features=features)
    if x_data is None:
        x_data, data_src = target.to(noise.dtype), f"teacher outputs ({teacher.name}) on the search noises (fallback)"
        if x0 != "teacher":  # asked for data (x0="auto") and none is known: say so, the table is not the published AYS
            warnings.warn(f"{AYS_FALLBACK_WARNING} (model {getattr(adapter, 'name', '?')})", UserWarning, stacklevel=2)
    klub = KLUB(adapter, x_data.to(noise.dtype), draws=draws, seed=seed, c=c)

    def to_sigmas(ts: list[float]) -> list[float]:
        nodes = conv.from_edm(torch.tensor(ts, dtype=torch.float64)).tolist()
        return table_from_nodes(adapter, nodes if last == "sigma_min" else nodes[:-1], solver, "ays").sigmas

    def metric(ts: list[float]) -> float:
        return score(rollout(adapter, solver, to_sigmas(ts), x=noise))

    cache: dict = ck.state.setdefault("searches", {})  # finished searches: n_pts (None: the shared one) → (ts, info)
    running: dict = ck.state.setdefault("running", {})  # their progress while they run (_hierarchical's run)

    def search(n_pts: int | None):
        out = _hierarchical(klub, lambda n: init_nodes(adapter, n, init_name), n_pts, base=base, candidates=candidates,
                            max_sweeps=max_sweeps, metric=metric if early_stop else None, progress=progress,
                            levels=levels, small=small, run=running.setdefault(n_pts, {}),
                            save=ck.save if ck.path is not None else None)
        cache[n_pts] = out
        running.pop(n_pts, None)
        ck.save()
        return out

    tables = []
    for nfe in nfes:
        K = steps_for(adapter, nfe, solver)
        n_pts = K if last == "sigma_min" else K + 1  # K evaluated nodes (+ the σ_min end point when last == "zero")
        own = n_pts < 3 or (small == "direct" and n_pts <= base)
        key = n_pts if own else None
        ts, info = cache[key] if key in cache else search(key)
        finest = None if own else [None if math.isinf(v) else v for v in ts]
        ts = ts if own else _to_count(ts, n_pts, conv)
        prov = {"klub_draws": draws, "candidates": candidates, "base": base, "levels": levels, "small": small,
                "last": last, "c": c, "x0_source": data_src, "teacher": teacher.describe(), "klub": klub.total(ts),
                "init": init_name, "early_stop_metric": oprov, "history": info.get("history"),
                "reference_seconds": round(t_ref, 3), "reference_calls": calls_ref,
                "objective_kind": objective_kind(objective_name, oprov["features"], teacher.name),
                "edm_schedule": [None if math.isinf(v) else v for v in ts], "finest_edm_schedule": finest}
        nodes = conv.from_edm(torch.tensor(ts[:K], dtype=torch.float64)).tolist()
        if ck.path is not None:
            prov["checkpoint"] = str(ck.path)
        if ck.resumed:  # the whole search's cost, this run and the runs it resumed (make_table keeps these)
            prov["resumed"] = dict(ck.earlier)
        t = table_from_nodes(adapter, nodes, solver, "ays", provenance=prov)
        t.objective = float(metric(ts))
        if ck.resumed and len(nfes) == 1:
            t.provenance.update(ck.spent())
        tables.append(t)
    return tables


def _option_signature() -> inspect.Signature:
    """ays_table's signature: (adapter, nfe, solver) and ays_tables' keyword options (for option checking)."""
    own = inspect.signature(ays_table).parameters
    opts = list(inspect.signature(ays_tables).parameters.values())[3:]
    return inspect.Signature([own["adapter"], own["nfe"], own["solver"], *opts])


ays_table.__signature__ = _option_signature()
