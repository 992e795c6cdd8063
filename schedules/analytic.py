"""Analytic denoisers with exact ODE solutions, for tests and sanity checks.

For Gaussian data x0 ~ N(μ, σ_d²·I) the denoiser E[x0 | x] is linear and the
probability-flow ODE has a closed-form solution, so solver orders, search optima and
"zero cost on a straight flow" can be checked exactly. σ_d = 0 (a point mass) makes every
flow-matching trajectory a straight line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from schedules.conventions import Convention


@dataclass
class GaussianDenoiser:
    """Exact denoiser for x0 ~ N(mean, data_std²) under ``convention``."""

    convention: Convention
    data_std: float = 0.5
    mean: float = 0.0
    calls: int = 0

    def denoise(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sb = s.to(torch.float64).view(-1, *([1] * (x.ndim - 1)))
        a, st = self.convention.alpha(sb), self.convention.sigma_t(sb)
        var = a**2 * self.data_std**2 + st**2
        # E[x0|x] = μ + α σ_d² (x - α μ) / (α² σ_d² + σ_t²)
        out = self.mean + a * self.data_std**2 * (x.to(torch.float64) - a * self.mean) / var
        return out.to(x.dtype)

    def marginal_std(self, s: float) -> float:
        s64 = torch.tensor(s, dtype=torch.float64)
        a, st = self.convention.alpha(s64), self.convention.sigma_t(s64)
        return float((a**2 * self.data_std**2 + st**2).sqrt())

    def exact_solution(self, x_start: torch.Tensor, s_start: float) -> torch.Tensor:
        """Where the probability-flow ODE takes ``x_start`` at ``s_start`` when it reaches s = 0.

        The ODE keeps the standardised coordinate (x - α(s)μ) / std(s) constant.
        """
        a = float(self.convention.alpha(torch.tensor(s_start, dtype=torch.float64)))
        z = (x_start.to(torch.float64) - a * self.mean) / self.marginal_std(s_start)
        return (self.mean + self.data_std * z).to(x_start.dtype)
