"""Hand-crafted schedules (baselines). Each is a pure function of (adapter, nfe, solver, **options).

Every generator returns a validated :class:`~schedules.table.TimestepTable` whose budget
is counted in NFE for the given solver (Heun: K = (NFE+1)//2 steps). A table of K steps
evaluates the model at K nodes and ends with the jump to σ = 0.

* **VP models**: every baseline is snapped to *distinct integer timesteps* of the model's
  grid (0..T-1), so the table replays exactly in diffusers schedulers that take
  ``timesteps=`` (DDPM, DPMSolverMultistep). Collisions after rounding are pushed apart.
* **Flow models**: any σ in [0, 1]; the first node is σ = 1 (pure noise).

Where a baseline needs the model's time — its σ range, EDM σ, snapping, where sampling
starts — it asks the convention (:mod:`schedules.conventions`); only the emulations of
diffusers' own schedulers (``default`` and the ``timestep_spacing`` family) are defined per
convention class, and refuse a convention they have no definition for.

References: DDIM (Song et al. 2021, uniform/quadratic), EDM (Karras et al. 2022, ρ=7),
DPM-Solver (Lu et al. 2022, logSNR-uniform), SD3 (Esser et al. 2024, shift), Align Your
Steps (Sabour et al. 2024, Gaussian closed form and published lists), diffusers
``timestep_spacing`` ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
Lin et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from schedules.adapters import ModelAdapter
from schedules.conventions import FlowConvention, VPConvention, apply_shift, distinct_descending_ints, karras_sigmas
from schedules.io import StepsmithError
from schedules.solvers import get_solver
from schedules.table import TimestepTable


def steps_for(adapter: ModelAdapter, nfe: int, solver: str) -> int:
    if not isinstance(nfe, int) or nfe < 1:
        raise StepsmithError(f"NFE must be a positive integer, got {nfe!r}")
    K = get_solver(solver).steps_for_nfe(nfe)
    T = adapter.convention.discrete_timesteps
    if T is not None and K > T:
        raise StepsmithError(f"{K} steps exceed the model's {T} timesteps")
    return K


# --------------------------------------------------------------------------- helpers


def _table(adapter: ModelAdapter, sigmas: Sequence[float], solver: str, method: str,
           provenance: dict | None = None) -> TimestepTable:
    return TimestepTable.from_sigmas(list(sigmas), convention=adapter.convention, prediction=adapter.prediction,
                                     solver=solver, method=method, model=adapter.name, provenance=provenance)


def table_from_nodes(adapter: ModelAdapter, nodes: Sequence[float], solver: str, method: str,
                     provenance: dict | None = None) -> TimestepTable:
    """K evaluated native sigmas (descending) → table; VP nodes snap to distinct integer timesteps."""
    return _table(adapter, adapter.convention.snap_nodes([float(v) for v in nodes]), solver, method, provenance)


def table_from_timesteps(adapter: ModelAdapter, timesteps: Sequence[float], solver: str, method: str,
                         provenance: dict | None = None) -> TimestepTable:
    """K model timesteps (VP: integer t; flow: σ·time_scale) → table ending at σ = 0."""
    conv = adapter.convention
    sig = conv.sigma_from_model_time(torch.tensor([float(t) for t in timesteps], dtype=torch.float64)).tolist()
    return _table(adapter, sig + [0.0], solver, method, provenance)


def _train_timesteps(adapter: ModelAdapter) -> int | None:
    return (adapter.scheduler_config or {}).get("num_train_timesteps")


def _range(adapter: ModelAdapter) -> tuple[float, float]:
    """(σ_min, σ_max) of evaluated nodes in native sigma (the convention's, with the scheduler's T)."""
    return adapter.convention.sampling_range(_train_timesteps(adapter))


def _from_noise(adapter: ModelAdapter, nodes: list[float]) -> list[float]:
    return adapter.convention.pin_noise_start(nodes)


# --------------------------------------------------------------------------- baselines


def uniform(adapter: ModelAdapter, nfe: int, solver: str = "euler") -> TimestepTable:
    """Uniform in the model's own time: σ = 1, (K-1)/K, ..., 1/K for flow; t = T-1..0 for VP (DDIM 'uniform')."""
    K = steps_for(adapter, nfe, solver)
    T = adapter.convention.discrete_timesteps
    if T is None:  # continuous time: uniform in σ from the top of the range to the terminal 0
        return _table(adapter, torch.linspace(_range(adapter)[1], 0.0, K + 1, dtype=torch.float64).tolist(), solver,
                      "uniform")
    ts = np.linspace(T - 1, 0, K) if K > 1 else np.array([T - 1.0])
    return table_from_timesteps(adapter, distinct_descending_ints(ts, T), solver, "uniform")


def quadratic(adapter: ModelAdapter, nfe: int, solver: str = "euler") -> TimestepTable:
    """DDIM's quadratic time (Song et al. 2021): nodes at u² of the time range, u uniform, denser near data."""
    K = steps_for(adapter, nfe, solver)
    T = adapter.convention.discrete_timesteps
    if T is None:  # continuous time: u² of the σ range, the terminal u = 0 included
        u = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64)
        return _table(adapter, (u**2 * _range(adapter)[1]).tolist(), solver, "quadratic")
    u = np.linspace(1.0, 0.0, K) if K > 1 else np.array([1.0])
    return table_from_timesteps(adapter, distinct_descending_ints((T - 1) * u**2, T), solver, "quadratic")


def karras(adapter: ModelAdapter, nfe: int, solver: str = "euler", rho: float = 7.0) -> TimestepTable:
    """EDM ρ-spacing (Karras et al. 2022) between the model's σ_max and σ_min (flow: directly on σ ∈ [σ_min, 1])."""
    K = steps_for(adapter, nfe, solver)
    lo, hi = _range(adapter)
    nodes = karras_sigmas(lo, hi, K, rho) if K > 1 else [hi]
    return table_from_nodes(adapter, _from_noise(adapter, nodes), solver, "karras")


def exponential(adapter: ModelAdapter, nfe: int, solver: str = "euler") -> TimestepTable:
    """Log-linear σ between σ_max and σ_min (k-diffusion ``get_sigmas_exponential``)."""
    K = steps_for(adapter, nfe, solver)
    lo, hi = _range(adapter)
    nodes = np.exp(np.linspace(math.log(hi), math.log(lo), K)).tolist() if K > 1 else [hi]
    return table_from_nodes(adapter, _from_noise(adapter, nodes), solver, "exponential")


def logsnr(adapter: ModelAdapter, nfe: int, solver: str = "euler") -> TimestepTable:
    """Uniform in logSNR λ = -2·log σ_edm (DPM-Solver's default). Flow: λ range of σ ∈ [σ_min, 1-σ_min], first node σ=1."""
    K = steps_for(adapter, nfe, solver)
    conv = adapter.convention
    lo_e, hi_e = conv.edm_range(_train_timesteps(adapter))
    lam = np.linspace(-2 * math.log(hi_e), -2 * math.log(lo_e), K) if K > 1 else np.array([-2 * math.log(hi_e)])
    nodes = [conv.from_edm(float(v)) for v in np.exp(-lam / 2)]
    return table_from_nodes(adapter, _from_noise(adapter, nodes), solver, "logsnr")


def shift(adapter: ModelAdapter, nfe: int, solver: str = "euler", shift: float = 3.0) -> TimestepTable:
    """SD3 time shift (Esser et al. 2024): σ' = shift·σ/(1+(shift-1)σ) applied to uniform σ. Flow models only."""
    if not isinstance(adapter.convention, FlowConvention):
        raise StepsmithError("the 'shift' baseline is defined for flow (FlowMatch) models; use karras or logsnr for VP")
    if not shift > 0:
        raise StepsmithError(f"shift must be positive, got {shift}")
    K = steps_for(adapter, nfe, solver)
    u = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64)
    return _table(adapter, apply_shift(u, float(shift)).tolist(), solver, "shift")


def _vp_scheduler_timesteps(adapter: ModelAdapter, K: int, spacing: str | None) -> list[int]:
    """Integer timesteps exactly as diffusers' DDIM/DDPM ``set_timesteps(K)`` gives them."""
    from diffusers import DDIMScheduler

    cfg = dict(adapter.scheduler_config or {})
    conv = adapter.convention
    keep = {k: cfg[k] for k in ("beta_start", "beta_end", "beta_schedule", "trained_betas", "steps_offset",
                               "timestep_spacing") if k in cfg and cfg[k] is not None}
    keep["num_train_timesteps"] = conv.num_train_timesteps
    if spacing is not None:
        keep["timestep_spacing"] = spacing
    if "beta_schedule" not in keep and "trained_betas" not in keep:  # our default VP: linear 1e-4..0.02
        keep.update(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    keep.setdefault("timestep_spacing", "leading")
    sched = DDIMScheduler(**keep)
    sched.set_timesteps(K)
    ts = [int(t) for t in sched.timesteps.tolist()]
    if len(set(ts)) != len(ts):
        raise StepsmithError(f"diffusers spacing {keep['timestep_spacing']!r} gives duplicate timesteps for {K} steps")
    return ts


def _flow_default_sigmas(adapter: ModelAdapter, K: int, shift_value: float | None = None) -> list[float]:
    """σ of diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps(K)`` (static shift), terminal 0 appended."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(adapter.scheduler_config or {})
    sh = float(shift_value if shift_value is not None else cfg.get("shift", 1.0))
    T = int(cfg.get("num_train_timesteps", 1000))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=sh)
    sched.set_timesteps(K)
    s = [float(v) for v in sched.sigmas.to(torch.float64).tolist()]
    return s


def _vp_spacing_sigmas(adapter: ModelAdapter, K: int, spacing: str | None) -> list[float]:
    """VP: the integer timesteps of DDIM/DDPM ``set_timesteps(K)`` (``spacing`` None: the config's own)."""
    return adapter.convention.timesteps_to_table(_vp_scheduler_timesteps(adapter, K, spacing))


def _flow_spacing_sigmas(adapter: ModelAdapter, K: int, spacing: str | None) -> list[float]:
    """Flow: FlowMatchEuler ``set_timesteps(K)`` (``spacing`` None: with the config's shift), or a spacing rule."""
    if spacing is None:
        return _flow_default_sigmas(adapter, K)
    if spacing == "linspace":
        return _flow_default_sigmas(adapter, K, 1.0)
    if spacing == "trailing":
        return torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64).tolist()
    T = int((adapter.scheduler_config or {}).get("num_train_timesteps", 1000))
    step = T // K
    return [(k * step + 1) / T for k in range(K)][::-1] + [0.0]


_DIFFUSERS_SPACINGS: dict[type, Callable[[ModelAdapter, int, str | None], list[float]]] = {
    VPConvention: _vp_spacing_sigmas,
    FlowConvention: _flow_spacing_sigmas,
}


def _diffusers_sigmas(adapter: ModelAdapter, K: int, spacing: str | None) -> list[float]:
    """The sigmas of the diffusers scheduler family this convention's models ship with."""
    fn = _DIFFUSERS_SPACINGS.get(type(adapter.convention))
    if fn is None:
        raise StepsmithError(f"diffusers' default schedules are emulated for flow and VP models, "
                             f"not {type(adapter.convention).__name__}")
    return fn(adapter, K, spacing)


def timestep_spacing(adapter: ModelAdapter, nfe: int, solver: str = "euler", spacing: str = "leading") -> TimestepTable:
    """diffusers ``timestep_spacing`` (linspace / leading / trailing).

    VP: the integer timesteps of DDIM/DDPM ``set_timesteps`` (leading honours ``steps_offset``).
    Flow: linspace = FlowMatchEuler's unshifted default σ = linspace(1, 1/T, K); trailing = σ = k/K
    (uniform, includes σ=1); leading = σ = (k·⌊T/K⌋ + 1)/T (never reaches σ = 1).
    """
    if spacing not in ("linspace", "leading", "trailing"):
        raise StepsmithError(f"unknown timestep_spacing {spacing!r}; use linspace, leading or trailing")
    K = steps_for(adapter, nfe, solver)
    return _table(adapter, _diffusers_sigmas(adapter, K, spacing), solver, spacing)


def default(adapter: ModelAdapter, nfe: int, solver: str = "euler") -> TimestepTable:
    """What the model's own diffusers scheduler does by default.

    VP: DDIM/DDPM ``set_timesteps(K)`` with the config's ``timestep_spacing`` (diffusers' default
    'leading') and ``steps_offset``. Flow: FlowMatchEuler ``set_timesteps(K)`` including the
    config's static ``shift``.
    """
    K = steps_for(adapter, nfe, solver)
    return _table(adapter, _diffusers_sigmas(adapter, K, None), solver, "default")


def ays_closed_form_nodes(sigma_min: float, sigma_max: float, n: int, data_std: float = 0.5) -> list[float]:
    """AYS optimum for Gaussian data (Sabour et al. 2024, eq. for DDIM/Euler), in EDM sigma, descending.

    t_i = c·tan((1-i/(n-1))·atan(t_min/c) + (i/(n-1))·atan(t_max/c)), i = n-1..0, c = data std.
    ``sigma_max`` may be ``inf`` (flow models start at pure noise).
    """
    c = float(data_std)
    a_lo, a_hi = math.atan(sigma_min / c), (math.pi / 2 if math.isinf(sigma_max) else math.atan(sigma_max / c))
    if n == 1:
        return [sigma_max]
    out = []
    for i in range(n - 1, -1, -1):
        f = i / (n - 1)
        out.append(c * math.tan((1 - f) * a_lo + f * a_hi) if not (f == 1 and math.isinf(sigma_max)) else math.inf)
    return out


def ays_gaussian(adapter: ModelAdapter, nfe: int, solver: str = "euler", data_std: float = 0.5) -> TimestepTable:
    """AYS closed form for Gaussian data with std ``data_std`` (EDM σ_data = 0.5 for images in [-1, 1])."""
    K = steps_for(adapter, nfe, solver)
    conv = adapter.convention
    lo, hi = _range(adapter)
    edm = ays_closed_form_nodes(conv.to_edm(lo), conv.to_edm(hi), K, data_std)
    return table_from_nodes(adapter, _from_noise(adapter, [conv.from_edm(e) for e in edm]), solver, "ays-gaussian")


def loglinear_interp(nodes: Sequence[float], n: int) -> list[float]:
    """Resample a descending positive sigma list to ``n`` nodes by linear interpolation of log σ over the index (AYS)."""
    xs = np.linspace(0, 1, len(nodes))
    ys = np.log(np.asarray(nodes, dtype=np.float64))
    if n == 1:
        return [float(nodes[0])]
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys)).tolist()


def ays_published(adapter: ModelAdapter, nfe: int, solver: str = "euler", which: str | None = None) -> TimestepTable:
    """Published 10-step AYS lists (diffusers ``AysSchedules``), log-linearly interpolated to K nodes.

    VP: ``StableDiffusionTimesteps`` (or ``which``) read as timesteps of *this* model's grid.
    Flow: ``StableDiffusionSigmas`` (EDM σ) mapped to flow σ = σ/(1+σ), first node set to σ = 1.
    """
    from diffusers.schedulers.scheduling_utils import AysSchedules

    K = steps_for(adapter, nfe, solver)
    conv = adapter.convention
    T = conv.discrete_timesteps
    key = which or ("StableDiffusionTimesteps" if T is not None else "StableDiffusionSigmas")
    if key not in AysSchedules:
        raise StepsmithError(f"unknown AYS list {key!r}; available: {', '.join(AysSchedules)}")
    lst = [float(v) for v in AysSchedules[key]]
    if key.endswith("Timesteps"):
        if T is None:
            raise StepsmithError(f"AYS list {key} holds VP timesteps; pick a *Sigmas list for a flow model")
        ts = [min(t * (T / 1000.0), T - 1) for t in lst]
        edm = conv.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist()
    else:
        edm = [v for v in lst if v > 0]
    nodes = [conv.from_edm(v) for v in loglinear_interp(edm, K)]
    return table_from_nodes(adapter, _from_noise(adapter, nodes), solver, "ays-published")


def _spacing(name: str) -> Callable[..., TimestepTable]:
    def f(adapter: ModelAdapter, nfe: int, solver: str = "euler") -> TimestepTable:
        return timestep_spacing(adapter, nfe, solver, spacing=name)

    f.__name__ = name
    f.__doc__ = f"diffusers timestep_spacing={name!r} (see :func:`timestep_spacing`)."
    return f


BASELINES: dict[str, Callable[..., TimestepTable]] = {
    "uniform": uniform,
    "quadratic": quadratic,
    "karras": karras,
    "exponential": exponential,
    "logsnr": logsnr,
    "shift": shift,
    "linspace": _spacing("linspace"),
    "leading": _spacing("leading"),
    "trailing": _spacing("trailing"),
    "default": default,
    "ays-gaussian": ays_gaussian,
    "ays-published": ays_published,
}


def baseline(adapter: ModelAdapter, name: str, nfe: int, solver: str = "euler", **options) -> TimestepTable:
    """Look up a baseline by name and build it; unknown names and options raise StepsmithError."""
    if name not in BASELINES:
        raise StepsmithError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    get_solver(solver)
    try:
        return BASELINES[name](adapter, nfe, solver, **options)
    except TypeError as exc:
        raise StepsmithError(f"baseline {name!r} does not take these options ({exc})") from None
