"""Time conventions: the one place where stepsmith says which way time runs.

Every model is described by its *native sigma* ``s`` and by ``x = α(s)·x0 + σ_t(s)·ε``:

==========  ==========================  ===================  ==================  ===============
convention  native sigma ``s``          α(s)                 σ_t(s)              network sees
==========  ==========================  ===================  ==================  ===============
``flow``    diffusers FlowMatch σ∈[0,1]  1 - s                s                   s·time_scale
``vp``      EDM σ = sqrt((1-ᾱ)/ᾱ)        1/sqrt(1+s²)         s/sqrt(1+s²)        discrete t
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


@dataclass(frozen=True, eq=False)
class VPConvention:
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


Convention = Union[FlowConvention, VPConvention]

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
