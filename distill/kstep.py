"""k-step distillation: rectified-flow distillation with t restricted to the k-grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill.base import Batch, TeacherPairs, straight_path
from distill.data import TeacherData
from schedules.conventions import Convention
from schedules.couplings import Coupling


class KStepDistillation:
    """k-step distillation of a rectified flow (Liu, Gong & Liu, "Flow Straight and Fast",
    ICLR 2023, arXiv:2209.03003, Sec. 2.3 / App.).

    Same fixed teacher coupling (z0, x1 = ODE(z0)) and straight-line targets as reflow, but
    t is drawn only from the k-step uniform grid {0, 1/k, …, (k-1)/k} (rectified-flow time),
    i.e. σ ∈ {1, (k-1)/k, …, 1/k} — the nodes a k-step uniform Euler sampler evaluates.
    For VP models the grid is the k-step uniform table in the model's discrete time
    (:func:`schedules.baselines.uniform`). Several k (budgets) are pooled. ``coupling`` re-couples
    the pairs as for :class:`distill.reflow.Reflow`.
    """

    name = "kstep"

    def __init__(self, data: TeacherData, grid_sigmas: Sequence[float], conv: Convention,
                 coupling: Coupling | None = None):
        self.data, self.conv = data, conv
        self.s_max = data.s_max
        tr, val = data.split("train"), data.split("val")
        self.train = TeacherPairs(data.noise[tr], data.final[tr], coupling or Coupling(), data.conditions_of(tr))
        self.val = TeacherPairs(data.noise[val], data.final[val], self.train.coupling.clipped(data.n_val),
                                data.conditions_of(val))
        self.grid = torch.tensor(sorted({float(v) for v in grid_sigmas if v > 0}, reverse=True), dtype=torch.float64)
        if len(self.grid) == 0:
            raise ValueError("empty k-grid")

    def _examples(self, z0: torch.Tensor, x1: torch.Tensor, g: torch.Tensor, c: torch.Tensor | None = None) -> Batch:
        s = self.grid[g]
        x, slope = straight_path(self.conv, z0, x1, s, self.s_max)
        return Batch(x, s, slope, c)

    def draw(self, gen: torch.Generator, batch_size: int) -> Batch:
        z0, x1, c = self.train.draw_conditioned(gen, batch_size)
        g = torch.randint(0, len(self.grid), (batch_size,), generator=gen)
        return self._examples(z0, x1, g, c)

    def validation(self) -> Batch:
        z0, x1, c = self.val.fixed_conditioned()
        k = len(self.grid)
        g = torch.arange(k).repeat(len(z0))
        return self._examples(z0.repeat_interleave(k, 0), x1.repeat_interleave(k, 0), g,
                             None if c is None else c.repeat_interleave(k, 0))

    def describe(self) -> dict:
        c = self.train.coupling
        return {"method": self.name, "grid": self.grid.tolist(), "train_pairs": self.data.n_train,
                "val_pairs": self.data.n_val, "coupling": c.kind, "ot_batch": c.ot_batch}
