"""BOSS straightening: regress the model's velocity onto teacher segment slopes at table nodes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill.base import Batch, conditions_of, ode_scale
from distill.data import TeacherData
from schedules.conventions import Convention
from schedules.table import TimestepTable


def table_segments(data: TeacherData, table: TimestepTable) -> list[tuple[int, int, float]]:
    """The table's steps as (input state index, target state index, input sigma) of ``data``.

    Step 0 reads the noise (state 0, recorded at σ_max) at the table's first node; step k > 0
    reads the teacher's state at node k.
    """
    idx = [data.node_index(v) for v in table.sigmas]
    return [(0 if k == 0 else a, b, data.nodes[a]) for k, (a, b) in enumerate(zip(idx[:-1], idx[1:]))]


class BOSSStraightening:
    """BOSS straightening (Nguyen et al., "Bellman Optimal Stepsize Straightening of
    Flow-Matching Models", ICLR 2024, arXiv:2312.16414).

    For each table (budget) with nodes τ_0 > … > τ_K = 0, the teacher's trajectory from
    noise gives segment pairs (x_τk, x_τk+1, τk, τk+1). The model is fine-tuned so that its
    velocity at the segment start equals the segment slope,

        L = E ‖ d_θ(x_τk, τk) - (y_τk+1 - y_τk) / (τk+1 - τk) ‖²,

    with y = x / c(s) the solver's ODE coordinates (y = x and d_θ = the FlowMatch velocity
    for flow models), so that one Euler step from τk lands on the teacher's x_τk+1: the
    few-step sampler on that table reproduces the teacher. With several tables, the
    segments of all of them are pooled. Examples are (trajectory, segment) pairs drawn
    uniformly; validation uses every segment of the held-out trajectories.

    The trajectories all start from the noise at the model's σ_max (:mod:`distill.data`). A
    table's first step is always taken from the noise itself, read at the table's first node τ0
    (that is what the sampler does), so its segment is (noise at τ0 → the teacher's x_τ1): for a
    table that starts at σ_max this is the usual first segment; for a "free start" table
    (τ0 < σ_max) the student learns exactly the jump the few-step sampler will make.

    Conditional models: every segment keeps the condition index of its trajectory, and the
    student's guided velocity is regressed (:mod:`distill.base`), at the teacher's guidance scale.
    """

    name = "boss"

    def __init__(self, data: TeacherData, tables: Sequence[TimestepTable], conv: Convention):
        self.data, self.conv = data, conv
        segs = sorted({seg for t in tables for seg in table_segments(data, t)})
        self.segments = torch.tensor([(a, b) for a, b, _ in segs], dtype=torch.long)  # [S, 2] state indices (a, b)
        nodes = torch.tensor(data.nodes, dtype=torch.float64)
        # s_a: the sigma the sampler reads state a at (the table's first node for the noise)
        self.s_a = torch.tensor([s for _, _, s in segs], dtype=torch.float64)
        self.s_b = nodes[self.segments[:, 1]]

    def _examples(self, traj: torch.Tensor, seg: torch.Tensor) -> Batch:
        a, b = self.segments[seg, 0], self.segments[seg, 1]
        xa, xb = self.data.states[traj, a], self.data.states[traj, b]
        sa, sb = self.s_a[seg], self.s_b[seg]
        ya = xa / ode_scale(self.conv, sa, xa)
        yb = xb / ode_scale(self.conv, sb, xb)
        slope = (yb - ya) / (sb - sa).to(xa.dtype).view(-1, *([1] * (xa.ndim - 1)))
        return Batch(xa, sa, slope, conditions_of(self.data.conditions, traj))

    def draw(self, gen: torch.Generator, batch_size: int) -> Batch:
        traj = torch.randint(0, self.data.n_train, (batch_size,), generator=gen)
        seg = torch.randint(0, len(self.segments), (batch_size,), generator=gen)
        return self._examples(traj, seg)

    def validation(self) -> Batch:
        val = torch.arange(self.data.n_train, self.data.n)
        traj = val.repeat_interleave(len(self.segments))
        seg = torch.arange(len(self.segments)).repeat(len(val))
        return self._examples(traj, seg)

    def describe(self) -> dict:
        return {"method": self.name, "segments": [[float(a), float(b)] for a, b in zip(self.s_a, self.s_b)],
                "train_pairs": self.data.n_train * len(self.segments), "val_pairs": self.data.n_val * len(self.segments)}
