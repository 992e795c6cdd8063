"""Reflow (2-rectified flow): flow matching on the teacher's fixed (noise, sample) coupling."""

from __future__ import annotations

import torch

from distill.base import Batch, straight_path
from distill.data import TeacherData
from schedules.conventions import Convention


class Reflow:
    """Reflow / 2-rectified flow (Liu, Gong & Liu, "Flow Straight and Fast: Learning to
    Generate and Transfer Data with Rectified Flow", ICLR 2023, arXiv:2209.03003).

    The teacher ODE couples each noise z0 with its sample x1 = ODE(z0). The model is
    retrained with flow matching on these *fixed* pairs, t uniform:
    x_t = t·x1 + (1 - t)·z0, target x1 - z0 (rectified-flow time, t = 1 - σ). In stepsmith's
    FlowMatch convention that is x = (1 - σ)·x1 + σ·z0 with dy/ds = z0 - x1, σ ~ U(0, 1].
    For VP models the straight line is taken in the EDM coordinates y = x / c(s) and the
    "uniform t" is uniform in the model's discrete time (its training distribution).
    Validation: the held-out pairs at fixed, evenly spread sigmas.
    """

    name = "reflow"

    def __init__(self, data: TeacherData, conv: Convention):
        self.data, self.conv = data, conv
        self.s_max = data.nodes[0]

    def sample_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Map u ∈ (0, 1] to native sigmas uniform in the model's own time."""
        if self.conv.name == "flow":
            return (u * self.s_max).to(torch.float64)
        T = self.conv.num_train_timesteps
        t_max = float(self.conv.model_time(torch.tensor([self.s_max], dtype=torch.float64))[0])
        return self.conv.sigma_from_model_time((u.to(torch.float64) * t_max).clamp(0, T - 1))

    def _examples(self, traj: torch.Tensor, s: torch.Tensor) -> Batch:
        z0, x1 = self.data.noise[traj], self.data.final[traj]
        x, slope = straight_path(self.conv, z0, x1, s, self.s_max)
        return Batch(x, s, slope)

    def draw(self, gen: torch.Generator, batch_size: int) -> Batch:
        traj = torch.randint(0, self.data.n_train, (batch_size,), generator=gen)
        u = 1 - torch.rand(batch_size, generator=gen, dtype=torch.float64)  # (0, 1]
        return self._examples(traj, self.sample_sigmas(u))

    def validation(self) -> Batch:
        val = torch.arange(self.data.n_train, self.data.n)
        u = (torch.arange(len(val), dtype=torch.float64) + 0.5) / len(val)
        return self._examples(val, self.sample_sigmas(u))

    def describe(self) -> dict:
        return {"method": self.name, "train_pairs": self.data.n_train, "val_pairs": self.data.n_val}
