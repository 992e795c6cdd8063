"""Time conventions: the one place where stepsmith says which way time runs.

Every model is described by its *native sigma* ``s`` and by ``x = α(s)·x0 + σ_t(s)·ε``:

==========  ==========================  ===================  ==================  ===============
convention  native sigma ``s``          α(s)                 σ_t(s)              network sees
==========  ==========================  ===================  ==================  ===============
``flow``    diffusers FlowMatch σ∈[0,1]  1 - s                s                   s·time_scale
``vp``      EDM σ = sqrt((1-ᾱ)/ᾱ)        1/sqrt(1+s²)         s/sqrt(1+s²)        discrete t
EDM         EDM σ (tables: ``vp``)       1                    s                   ¼·log s
==========  ==========================  ===================  ==================  ===============

* **Sampling always runs from large s (noise) to s = 0 (data).** A table of K steps holds
  K+1 sigmas, strictly decreasing, the last one exactly 0. The final jump to s = 0 *is*
  a step and costs one model evaluation (at the node before it); no evaluation happens at
  s = 0 itself.
* ``flow`` is diffusers' FlowMatch convention (SD3, Flux): σ=1 is pure noise, the network
  predicts the velocity ε - x0 and receives ``timestep = σ·time_scale`` (1000 for diffusers
  models, 1 for plain ``module(x, t)`` callables).
* Rectified flow (Liu et al., BOSS code) runs the other way: t_rf = 1 - σ (t=0 noise,
  t=1 data), see :func:`flow_to_rf`.
* ``vp`` covers DDPM/SD1.5/SDXL: the network receives the discrete timestep t ∈ [0, T),
  with ᾱ_t from the scheduler's betas; native sigma is the EDM sigma of that timestep.
  Fractional t is obtained by interpolating log σ between neighbouring timesteps (as
  diffusers' ``EulerDiscreteScheduler`` does).
* logSNR λ = log(α²/σ_t²) = -2·log(s_edm).
* Each convention owns its time, so samplers, searches and baselines never branch on its name:
  ``to_edm`` / ``from_edm``, ``sampling_range`` (σ_min/σ_max of evaluated nodes), ``edm_range``,
  ``reference_sigmas`` (the teacher's grid), ``search_grid``, ``snap_nodes`` (a table's sigmas
  from evaluated nodes), ``pin_noise_start``, ``add_noise`` and ``discrete_timesteps``.
* diffusers' FlowMatch ``shift`` maps σ to shift·σ / (1 + (shift-1)·σ) *after* a schedule is
  set; a searched table holds the σ the model really sees, see :func:`apply_shift` and
  :func:`inverse_shift`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Union

import torch

from schedules.io import StepsmithError

# ---------------------------------------------------------------- scalar conversions


def flow_to_rf(sigma):
    """diffusers FlowMatch σ (1 = noise) → rectified-flow t (0 = noise)."""
    return 1 - sigma


def rf_to_flow(t):
    return 1 - t


def flow_to_edm(sigma):
    """FlowMatch σ → EDM σ of the rescaled state x/(1-σ) = x0 + σ_edm·ε (∞ at σ=1)."""
    return sigma / (1 - sigma)


def edm_to_flow(sigma_edm):
    return sigma_edm / (1 + sigma_edm)


def alphas_cumprod_to_edm(alphas_cumprod):
    """VP ᾱ → EDM σ = sqrt((1-ᾱ)/ᾱ)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def edm_to_alphas_cumprod(sigma_edm):
    return 1 / (1 + sigma_edm**2)


def edm_to_logsnr(sigma_edm):
    """EDM σ → logSNR λ = log(α²/σ_t²) = -2 log σ."""
    if isinstance(sigma_edm, torch.Tensor):
        return -2 * torch.log(sigma_edm)
    return -2 * math.log(sigma_edm)


def logsnr_to_edm(logsnr):
    if isinstance(logsnr, torch.Tensor):
        return torch.exp(-logsnr / 2)
    return math.exp(-logsnr / 2)


def flow_to_logsnr(sigma):
    return edm_to_logsnr(flow_to_edm(sigma))


def apply_shift(sigma, shift: float):
    """diffusers FlowMatch time shift: σ' = shift·σ / (1 + (shift-1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def inverse_shift(sigma_shifted, shift: float):
    """The σ that :func:`apply_shift` maps to ``sigma_shifted``."""
    return sigma_shifted / (shift - (shift - 1) * sigma_shifted)


# ---------------------------------------------------------------- spacings the conventions build on

FLOW_SIGMA_MIN = 1e-3  # diffusers FlowMatch default last nonzero σ (1/num_train_timesteps)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """n sigmas from sigma_max down to sigma_min, EDM (Karras et al. 2022) ρ spacing."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist()


def distinct_descending_ints(ts, T: int) -> list[int]:
    """Round to integers in [0, T-1], strictly decreasing; collisions are pushed apart.

    Pushes toward t=0 first, then (if the tail runs out of room) back toward T-1.
    """
    K = len(ts)
    if K > T:
        raise StepsmithError(f"{K} distinct timesteps do not fit in {T} training timesteps")
    r = [int(min(max(round(float(t)), 0), T - 1)) for t in ts]
    for i in range(1, K):  # forward pass: each strictly below its predecessor
        if r[i] >= r[i - 1]:
            r[i] = r[i - 1] - 1
    for i in range(K - 1, -1, -1):  # backward pass: keep within [0, ...] room
        lo = K - 1 - i
        if r[i] < lo:
            r[i] = lo
        if i < K - 1 and r[i] <= r[i + 1]:
            r[i] = r[i + 1] + 1
    return r


# ---------------------------------------------------------------- model conventions


def _as_tensor(s, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(s, torch.Tensor):
        return s
    return torch.as_tensor(s, dtype=torch.float64 if like is None else like.dtype)


@dataclass(frozen=True)
class FlowConvention:
    """diffusers FlowMatch: x = (1-σ)·x0 + σ·ε, σ ∈ [0, 1], network gets σ·time_scale."""

    time_scale: float = 1.0
    name: str = field(default="flow", init=False)
    sigma_max: float = field(default=1.0, init=False)
    sigma_min: float = field(default=0.0, init=False)

    def alpha(self, s):
        return 1 - s

    def sigma_t(self, s):
        return s

    def ode_scale(self, s):
        """``c(s)``: the sampler integrates y = x / c(s) against time s (see solvers)."""
        return torch.ones_like(_as_tensor(s)) if isinstance(s, torch.Tensor) else 1.0

    def model_time(self, s):
        return _as_tensor(s) * self.time_scale

    def sigma_from_model_time(self, t):
        return _as_tensor(t) / self.time_scale

    def config(self) -> dict:
        return {"time_scale": self.time_scale}

    def check_sigmas(self, sigmas: list[float]) -> str | None:
        if sigmas[0] > 1.0 + 1e-9:
            return f"flow sigmas lie in [0, 1] but the first is {sigmas[0]:g}: this looks like a VP/EDM table"
        return None

    # -- time: what samplers, searches and baselines ask of the convention

    discrete_timesteps = None  # continuous time: any σ ∈ [0, 1] is a valid node

    def to_edm(self, s):
        """Native σ → EDM σ of the rescaled state x/(1-σ) (∞ at σ = 1, pure noise)."""
        if isinstance(s, torch.Tensor):
            return torch.where(s >= 1, torch.full_like(s, math.inf), s / (1 - s))
        return math.inf if s >= 1.0 else s / (1 - s)

    def from_edm(self, t):
        """EDM σ → native σ (∞ ↦ 1)."""
        if isinstance(t, torch.Tensor):
            return torch.where(torch.isinf(t), torch.ones_like(t), t / (1 + t))
        return 1.0 if math.isinf(t) else t / (1 + t)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, s) -> torch.Tensor:
        """The state at native sigma ``s`` (broadcasting against ``x0``): (1-σ)·x0 + σ·ε."""
        return (1 - s) * x0 + s * eps

    def sampling_range(self, num_train_timesteps: int | None = None) -> tuple[float, float]:
        """(σ_min, σ_max) of evaluated nodes: diffusers FlowMatch's 1/T (T from the scheduler config) up to 1."""
        return (1.0 / float(num_train_timesteps) if num_train_timesteps else FLOW_SIGMA_MIN), 1.0

    def edm_range(self, num_train_timesteps: int | None = None) -> tuple[float, float]:
        """Finite EDM σ range of evaluated nodes: σ = 1 is infinite, so the top mirrors σ_min (σ = 1 - σ_min)."""
        lo, _ = self.sampling_range(num_train_timesteps)
        return self.to_edm(lo), self.to_edm(1.0 - lo)

    def pin_noise_start(self, nodes: list[float]) -> list[float]:
        """FlowMatch samplers start at pure noise: the first node is σ = 1 whatever the spacing."""
        return [1.0, *nodes[1:]] if nodes else nodes

    def reference_sigmas(self, steps: int = 200) -> list[float]:
        """The teacher's fine grid: uniform in σ from 1 to 0."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()

    def search_grid(self, n: int, kind: str = "auto") -> list[float]:
        """n+1 descending search nodes ending in 0: uniform in σ."""
        if kind not in ("auto", "uniform"):
            raise StepsmithError(f"flow grids are uniform in σ; unknown grid kind {kind!r}")
        return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).tolist()

    def snap_nodes(self, nodes: list[float]) -> list[float]:
        """K evaluated sigmas → the table's K+1 sigmas: clipped to [0, 1], terminal 0 appended."""
        return [min(max(float(v), 0.0), 1.0) for v in nodes] + [0.0]


class _EDMSigmaTime:
    """Time methods of conventions whose native sigma *is* the EDM σ (VP, EDM), within [sigma_min, sigma_max]."""

    sigma_min: float
    sigma_max: float

    def to_edm(self, s):
        return s

    def from_edm(self, t):
        return t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, s) -> torch.Tensor:
        """The state at native sigma ``s`` (broadcasting against ``x0``): α(s)·(x0 + s·ε)."""
        return self.alpha(s) * (x0 + s * eps)

    def sampling_range(self, _num_train_timesteps: int | None = None) -> tuple[float, float]:
        """(σ_min, σ_max) of evaluated nodes: the model's own range (its timesteps fix it; T is not needed)."""
        return self.sigma_min, self.sigma_max

    def edm_range(self, _num_train_timesteps: int | None = None) -> tuple[float, float]:
        """Finite EDM σ range of evaluated nodes: the sampling range itself."""
        return self.sampling_range()

    def pin_noise_start(self, nodes: list[float]) -> list[float]:
        """σ_max is not pure noise here, so a spacing keeps its own first node."""
        return nodes

    def reference_sigmas(self, steps: int = 200) -> list[float]:
        """The teacher's fine grid: EDM's ρ = 7 spacing from σ_max to σ_min, then the final jump to 0."""
        return karras_sigmas(self.sigma_min, self.sigma_max, steps) + [0.0]


@dataclass(frozen=True, eq=False)
class VPConvention(_EDMSigmaTime):
    """Variance preserving (DDPM, SD1.5, SDXL): x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε.

    Native sigma is the EDM sigma sqrt((1-ᾱ)/ᾱ); the network gets the (possibly
    fractional) discrete timestep.
    """

    alphas_cumprod: torch.Tensor
    name: str = field(default="vp", init=False)

    def __post_init__(self):
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or len(ac) < 2 or not torch.all((ac > 0) & (ac <= 1)):
            raise StepsmithError("alphas_cumprod must be a 1-D tensor of values in (0, 1]")
        if not torch.all(ac[1:] < ac[:-1]):
            raise StepsmithError("alphas_cumprod must be strictly decreasing in t")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_log_sigmas", torch.log(alphas_cumprod_to_edm(ac)))

    @classmethod
    def from_scheduler_config(cls, config: dict) -> VPConvention:
        """ᾱ exactly as diffusers computes it from a scheduler config (betas, schedule)."""
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        cfg = {k: config[k] for k in keys if k in config and config[k] is not None}
        if cfg.get("rescale_betas_zero_snr"):
            raise StepsmithError(
                "zero-terminal-SNR schedulers (rescale_betas_zero_snr=True) have σ=∞ at the last "
                "timestep; stepsmith's VP convention needs finite sigmas — not supported yet"
            )
        return cls(DDPMScheduler(**cfg).alphas_cumprod.to(torch.float64))

    @classmethod
    def default(cls) -> VPConvention:
        """DDPM linear betas 1e-4..0.02, T = 1000."""
        return cls.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                          "beta_start": 1e-4, "beta_end": 0.02})

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def discrete_sigmas(self) -> torch.Tensor:
        """EDM sigma of every discrete timestep t = 0..T-1 (increasing in t)."""
        return self._log_sigmas.exp()

    @property
    def sigma_max(self) -> float:
        return float(self.discrete_sigmas[-1])

    @property
    def sigma_min(self) -> float:
        return float(self.discrete_sigmas[0])

    def alpha(self, s):
        return (1 + s**2) ** -0.5

    def sigma_t(self, s):
        return s * (1 + s**2) ** -0.5

    def ode_scale(self, s):
        return self.alpha(s)

    def model_time(self, s):
        """EDM sigma → fractional timestep, interpolating log σ (diffusers' ``_sigma_to_t``)."""
        s = _as_tensor(s)
        if torch.any(s <= 0):
            raise StepsmithError("σ = 0 has no VP timestep: the model is never evaluated at the terminal σ")
        log_s = torch.log(s.to(torch.float64))
        ls = self._log_sigmas
        if torch.any(log_s < ls[0] - 1e-6) or torch.any(log_s > ls[-1] + 1e-6):
            raise StepsmithError(
                f"σ outside the model's range [{self.sigma_min:.4g}, {self.sigma_max:.4g}]; "
                "VP tables must stay within the trained timesteps"
            )
        log_s = log_s.clamp(ls[0], ls[-1])
        idx = torch.searchsorted(ls, log_s).clamp(1, len(ls) - 1)
        lo, hi = ls[idx - 1], ls[idx]
        w = (log_s - lo) / (hi - lo)
        return (idx - 1 + w).to(s.dtype)

    def sigma_from_model_time(self, t):
        t = _as_tensor(t).to(torch.float64)
        T = self.num_train_timesteps
        if torch.any(t < -1e-9) or torch.any(t > T - 1 + 1e-9):
            raise StepsmithError(f"VP timesteps must lie in [0, {T - 1}]")
        t = t.clamp(0, T - 1)
        lo = t.floor().long().clamp(max=T - 2)
        w = t - lo
        return torch.exp((1 - w) * self._log_sigmas[lo] + w * self._log_sigmas[lo + 1])

    def fingerprint(self) -> str:
        """Short hash of ᾱ: a table searched for another noise schedule is refused."""
        data = self.alphas_cumprod.numpy().round(10).tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "alphas_cumprod_sha256": self.fingerprint()}

    def check_sigmas(self, sigmas: list[float]) -> str | None:
        if sigmas[0] > self.sigma_max * (1 + 1e-6):
            return f"first sigma {sigmas[0]:g} exceeds the model's σ_max {self.sigma_max:.4g}"
        if len(sigmas) > 1 and sigmas[-2] < self.sigma_min * (1 - 1e-6):
            return f"last nonzero sigma {sigmas[-2]:g} is below the model's σ_min {self.sigma_min:.4g}"
        return None

    # -- time: searched and baseline tables sit on distinct integer timesteps (exact diffusers replay)

    @property
    def discrete_timesteps(self) -> int:
        return self.num_train_timesteps

    def timesteps_to_table(self, ts) -> list[float]:
        """Integer timesteps (descending) → the table's sigmas, terminal 0 appended."""
        return self.sigma_from_model_time(torch.tensor([float(t) for t in ts], dtype=torch.float64)).tolist() + [0.0]

    def search_grid(self, n: int, kind: str = "auto") -> list[float]:
        """n+1 descending search nodes ending in 0: distinct integer timesteps, EDM ρ = 7 (or uniform in t)."""
        T = self.num_train_timesteps
        if n > T:
            raise StepsmithError(f"a VP grid has at most {T} nodes (the training timesteps); got --grid {n}")
        if kind in ("auto", "rho"):
            sig = torch.tensor(karras_sigmas(self.sigma_min, self.sigma_max, n, 7.0), dtype=torch.float64)
            ts = self.model_time(sig.clamp(self.sigma_min, self.sigma_max)).tolist()
        elif kind == "uniform":
            ts = torch.linspace(T - 1, 0, n, dtype=torch.float64).tolist()
        else:
            raise StepsmithError(f"unknown VP grid kind {kind!r}; use rho or uniform")
        return self.timesteps_to_table(distinct_descending_ints(ts, T))

    def snap_nodes(self, nodes: list[float]) -> list[float]:
        """K evaluated sigmas → the table's K+1 sigmas, snapped to distinct integer timesteps."""
        clipped = torch.tensor([min(max(float(v), self.sigma_min), self.sigma_max) for v in nodes], dtype=torch.float64)
        return self.timesteps_to_table(distinct_descending_ints(self.model_time(clipped).tolist(), self.num_train_timesteps))


@dataclass(frozen=True)
class EDMConvention(_EDMSigmaTime):
    """EDM-preconditioned models (Karras et al. 2022; diffusers ``EDMEulerScheduler``): x = x0 + σ·ε.

    Native sigma is the EDM σ itself, α = 1, σ_t = s; the network receives
    c_noise = ¼·log σ (diffusers' ``precondition_noise``; c_in/c_skip/c_out are the
    scheduler's business). Tables record these models under the ``vp`` name: the native
    sigma is the same EDM σ and the solvers integrate the same y = x/c(s) = x0 + s·ε, so a
    ``vp`` table replays unchanged — only the state's scale (α = 1 instead of
    1/sqrt(1+s²)) and the network's time differ. There is no ᾱ to compare: the σ range is
    the model fact a table is checked against.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    name: str = field(default="vp", init=False)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> EDMConvention:
        """The σ range and σ_data of an EDM scheduler config (diffusers' defaults where absent)."""
        return cls(*(float(config.get(k, d)) for k, d in
                     (("sigma_min", 0.002), ("sigma_max", 80.0), ("sigma_data", 0.5))))

    def alpha(self, s):
        return torch.ones_like(s) if isinstance(s, torch.Tensor) else 1.0

    def sigma_t(self, s):
        return s

    def ode_scale(self, s):
        return self.alpha(s)

    def model_time(self, s):
        """EDM σ → c_noise = ¼·log σ."""
        s = _as_tensor(s)
        if torch.any(s <= 0):
            raise StepsmithError("σ = 0 has no EDM c_noise: the model is never evaluated at the terminal σ")
        return 0.25 * torch.log(s)

    def sigma_from_model_time(self, t):
        return torch.exp(4 * _as_tensor(t))

    def config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}

    def check_sigmas(self, sigmas: list[float]) -> str | None:
        s = [v for v in sigmas if v != 0.0]
        if s and (s[0] > self.sigma_max * (1 + 1e-5) or s[-1] < self.sigma_min * (1 - 1e-5)):
            return (f"table sigmas [{s[-1]:.4g}, {s[0]:.4g}] leave the EDM model's range "
                    f"[{self.sigma_min:.4g}, {self.sigma_max:.4g}]")
        return None

    # -- time: continuous σ in [sigma_min, sigma_max]

    discrete_timesteps = None

    def search_grid(self, n: int, kind: str = "auto") -> list[float]:
        """n+1 descending search nodes ending in 0: EDM ρ = 7 spacing over the model's σ range."""
        if kind not in ("auto", "rho"):
            raise StepsmithError(f"EDM grids use ρ = 7 spacing; unknown grid kind {kind!r}")
        return karras_sigmas(self.sigma_min, self.sigma_max, n) + [0.0]

    def snap_nodes(self, nodes: list[float]) -> list[float]:
        """K evaluated sigmas → the table's K+1 sigmas: clipped to the σ range, terminal 0 appended."""
        return [min(max(float(v), self.sigma_min), self.sigma_max) for v in nodes] + [0.0]


Convention = Union[FlowConvention, VPConvention, EDMConvention]

PREDICTIONS = {"flow": ("flow",), "vp": ("epsilon", "v", "x0")}


def prediction_to_x0(conv: Convention, prediction: str, x: torch.Tensor, s: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """Convert a network output to the x0 (data) estimate. ``s`` broadcasts against ``x``."""
    if prediction == "flow":  # v = ε - x0 and x = (1-s)·x0 + s·ε  ⇒  x0 = x - s·v
        return x - s * out
    a, sg = conv.alpha(s), conv.sigma_t(s)
    if prediction == "epsilon":
        return (x - sg * out) / a
    if prediction == "v":  # v = α·ε - σ_t·x0
        return a * x - sg * out
    if prediction == "x0":
        return out
    raise StepsmithError(f"unknown prediction type {prediction!r}; use flow, epsilon, v or x0")


def x0_to_prediction(conv: Convention, prediction: str, x0: torch.Tensor, eps: torch.Tensor,
                     s: torch.Tensor) -> torch.Tensor:
    """The training target of a network with this prediction type (for distillation)."""
    if prediction == "flow":
        return eps - x0
    a, sg = conv.alpha(s), conv.sigma_t(s)
    if prediction == "epsilon":
        return eps
    if prediction == "v":
        return a * eps - sg * x0
    if prediction == "x0":
        return x0
    raise StepsmithError(f"unknown prediction type {prediction!r}; use flow, epsilon, v or x0")
