"""Reflow (2-rectified flow): flow matching on the teacher's fixed (noise, sample) coupling."""

from __future__ import annotations

import torch

from distill.base import Batch, TeacherPairs, straight_path
from distill.data import TeacherData
from schedules.conventions import Convention
from schedules.couplings import Coupling


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

    ``coupling`` other than ``independent`` re-couples noises and teacher samples by minibatch
    OT (:class:`distill.base.TeacherPairs`: "OT-reflow"); the held-out pairs are coupled the same way.
    Conditional models: each pair is trained under its teacher sample's condition (``c2ot`` keeps
    noises within their condition).
    """

    name = "reflow"

    def __init__(self, data: TeacherData, conv: Convention, coupling: Coupling | None = None):
        self.data, self.conv = data, conv
        self.s_max = data.s_max
        tr, val = data.split("train"), data.split("val")
        self.train = TeacherPairs(data.noise[tr], data.final[tr], coupling or Coupling(), data.conditions_of(tr))
        self.val = TeacherPairs(data.noise[val], data.final[val], self.train.coupling.clipped(data.n_val),
                                data.conditions_of(val))

    def sample_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Map u ∈ (0, 1] to native sigmas uniform in the model's own time."""
        if self.conv.name == "flow":
            return (u * self.s_max).to(torch.float64)
        T = self.conv.num_train_timesteps
        t_max = float(self.conv.model_time(torch.tensor([self.s_max], dtype=torch.float64))[0])
        return self.conv.sigma_from_model_time((u.to(torch.float64) * t_max).clamp(0, T - 1))

    def _examples(self, z0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor, c: torch.Tensor | None = None) -> Batch:
        x, slope = straight_path(self.conv, z0, x1, s, self.s_max)
        return Batch(x, s, slope, c)

    def draw(self, gen: torch.Generator, batch_size: int) -> Batch:
        z0, x1, c = self.train.draw_conditioned(gen, batch_size)
        u = 1 - torch.rand(batch_size, generator=gen, dtype=torch.float64)  # (0, 1]
        return self._examples(z0, x1, self.sample_sigmas(u), c)

    def validation(self) -> Batch:
        z0, x1, c = self.val.fixed_conditioned()
        u = (torch.arange(len(z0), dtype=torch.float64) + 0.5) / len(z0)
        return self._examples(z0, x1, self.sample_sigmas(u), c)

    def describe(self) -> dict:
        c = self.train.coupling
        return {"method": self.name, "train_pairs": self.data.n_train, "val_pairs": self.data.n_val,
                "coupling": c.kind, "ot_batch": c.ot_batch}
