"""Small exact models for search tests and sanity checks (built on :mod:`schedules.analytic`)."""

from __future__ import annotations

import torch
from torch import nn

from schedules.adapters import ModelAdapter
from schedules.analytic import GaussianDenoiser
from schedules.conventions import FlowConvention, VPConvention, x0_to_prediction


class GaussianModule(nn.Module):
    """Network whose output is the exact prediction for Gaussian data N(mean, data_std²)."""

    def __init__(self, convention, prediction: str, data_std: float = 0.5, mean: float = 0.0):
        super().__init__()
        self.den = GaussianDenoiser(convention, data_std, mean)
        self.conv = convention
        self.prediction = prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.conv.sigma_from_model_time(t.to(torch.float64)).to(torch.float64)
        x0 = self.den.denoise(x, s)
        sb = s.view(-1, *([1] * (x.ndim - 1)))
        a, st = self.conv.alpha(sb), self.conv.sigma_t(sb)
        eps = ((x.to(torch.float64) - a * x0.to(torch.float64)) / st).to(x.dtype)
        return x0_to_prediction(self.conv, self.prediction, x0, eps, sb.to(x.dtype)).to(x.dtype)


def gaussian_adapter(convention: str = "flow", data_std: float = 0.5, mean: float = 0.0, dim: int = 4,
                     prediction: str | None = None) -> ModelAdapter:
    """A ModelAdapter around the exact Gaussian denoiser (data_std=0 + flow: exactly straight trajectories)."""
    conv = FlowConvention(1.0) if convention == "flow" else VPConvention.default()
    pred = prediction or ("flow" if convention == "flow" else "epsilon")
    mod = GaussianModule(conv, pred, data_std, mean)
    return ModelAdapter(module=mod, convention=conv, prediction=pred, sample_shape=(dim,),
                        name=f"gaussian-{convention}-{data_std:g}")
