"""What every distillation method shares: the velocity in the solver's ODE coordinates.

All samplers of :mod:`schedules.solvers` integrate y = x / c(s) against the native sigma
s with dy/ds = (y - D(x, s)) / s; an Euler step from s to s' is y' = y + (s' - s)·dy/ds.
A straightened model is one whose dy/ds at a node equals the *segment slope*
(y(s') - y(s)) / (s' - s) of the teacher trajectory, so that one Euler step lands on the
teacher. Every method here regresses

    d_θ(x, s) = (x / c(s) - D_θ(x, s)) / s      onto a target slope,

computed through :meth:`ModelAdapter.model_output` (gradients kept). For flow models
(c = 1) d_θ *is* the network's velocity ε - x0, so the loss is the usual flow-matching
MSE in the model's own convention; for ε-prediction VP models d_θ is exactly the
predicted ε (y is the EDM state x0 + s·ε); v and x0 predictions go through
:func:`schedules.conventions.prediction_to_x0`.

Methods draw their *global* batch from a generator seeded by (seed, step): every process
draws the same batch and takes its own slice, so 1 process and N processes at the same
global batch see the same examples, and a resumed run draws the batches it would have.

Conditional models (:class:`schedules.conditioning.ConditionalAdapter`): every example carries the
condition index of the teacher trajectory it comes from (:attr:`Batch.cond`), and the loss binds
those indices (:func:`schedules.conditioning.bind`) around the student's call, so the student is
evaluated on (x, s, condition) with the conditioning and guidance scale of the teacher. What is
regressed is the student's *guided* output o_u + w·(o_c − o_u): the student is sampled afterwards
with the same guidance w (its table and its adapter record w), so that is the denoiser whose Euler
steps must land on the teacher's guided trajectory; the gradient reaches the conditional and the
unconditional branch of the same network (full fine-tune or LoRA). At w = 1 the adapter skips the
unconditional half, so only the conditional branch is trained — again exactly what is sampled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from schedules.adapters import ModelAdapter
from schedules.conditioning import bind
from schedules.conventions import Convention, prediction_to_x0
from schedules.couplings import Coupling


def _bcast(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def ode_scale(conv: Convention, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """c(s) broadcast against ``x`` (1 for flow, α(s) for VP)."""
    return _bcast(conv.ode_scale(s.to(torch.float64)), x)


def ode_velocity(adapter: ModelAdapter, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dy/ds of the model at (x, s), with gradients; s is a [B] tensor of native sigmas > 0."""
    out = adapter.model_output(x, s)
    if adapter.prediction in ("flow", "epsilon"):
        return out  # exact: flow velocity ε - x0; for ε-prediction VP, dy/ds = ε̂
    sb = _bcast(s, x)
    x0 = prediction_to_x0(adapter.convention, adapter.prediction, x, sb, out)
    return (x / ode_scale(adapter.convention, s, x) - x0) / sb


@dataclass
class Batch:
    """Model inputs and regression targets: x at native sigma s, target slope dy/ds; ``cond`` the
    condition index of each example (conditional models; ``None`` for unconditional ones)."""

    x: torch.Tensor
    s: torch.Tensor
    slope: torch.Tensor
    cond: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def slice(self, sl: slice) -> Batch:
        return Batch(self.x[sl], self.s[sl], self.slope[sl], None if self.cond is None else self.cond[sl])

    def to(self, device, dtype=None) -> Batch:
        return Batch(self.x.to(device=device, dtype=dtype or self.x.dtype), self.s.to(device),
                     self.slope.to(device=device, dtype=dtype or self.slope.dtype), self.cond)


def conditions_of(cond: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The condition indices of the examples drawn at ``index`` (None for unconditional data)."""
    return None if cond is None else cond[index]


def bound(batch: Batch):
    """The binding of the batch's condition indices (condition c is sample c: c mod P = c), or a no-op."""
    return contextlib.nullcontext() if batch.cond is None else bind(batch.cond)


class DistillMethod(Protocol):
    """A distillation objective over fixed teacher data."""

    name: str

    def draw(self, gen: torch.Generator, batch_size: int) -> Batch:
        """A global training batch (CPU tensors), reproducible from ``gen``."""
        ...

    def validation(self) -> Batch:
        """The fixed held-out batch (same every call)."""
        ...

    def describe(self) -> dict: ...


def straightening_loss(adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    """MSE between the model's dy/ds and the target slopes (conditional models: under each example's condition)."""
    with bound(batch):
        d = ode_velocity(adapter, batch.x, batch.s)
    return torch.mean((d.float() - batch.slope.float()) ** 2)


def straight_path(conv: Convention, z0: torch.Tensor, x1: torch.Tensor, s: torch.Tensor,
                  s_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Point at sigma ``s`` on the straight line (in y) from noise ``z0`` to data ``x1``, and its slope.

    Flow: x = (1 - s)·x1 + s·z0, dy/ds = z0 - x1 (rectified flow's interpolation with t = 1 - σ).
    VP: the straight line in the EDM coordinates y = x / c(s) from the teacher's start
    y(s_max) = z0 / c(s_max) to x1: y(s) = x1 + s·(y(s_max) - x1) / s_max, x = c(s)·y(s).
    """
    sb = _bcast(s, x1)
    if conv.name == "flow":
        x = (1 - sb) * x1 + sb * z0
        return x, (z0 - x1).expand_as(x)
    c_max = float(conv.ode_scale(torch.tensor(s_max, dtype=torch.float64)))
    slope = (z0 / c_max - x1) / s_max
    y = x1 + sb * slope
    return y * ode_scale(conv, s, x1), slope.expand_as(y)


@dataclass
class TeacherPairs:
    """The (noise, teacher sample) pairs reflow and k-step distillation train on, optionally re-coupled.

    ``independent`` keeps the teacher's own coupling (z0, ODE(z0)) — reflow as Liu et al. define it.
    ``ot`` / ``c2ot`` re-couple: the noises and the teacher samples of a pool are drawn from
    *independent* trajectory indices (so the teacher's pairing plays no part) and matched by the
    coupling within each OT batch (:class:`schedules.couplings.Coupling`), on the CPU, when the batch
    is drawn. That is minibatch OT flow matching towards the teacher's sample distribution
    ("OT-reflow"): the straight-line targets then join nearby noise and samples, which the
    teacher's pairs do not, at the price of no longer matching the teacher sample by sample.

    ``cond`` (conditional models) is the condition index of each trajectory. A pair is trained
    under the condition of its teacher *sample* x1 (the sample was generated under it). ``c2ot``
    uses these indices as class labels: a noise carries the condition of the sample it was drawn
    with and OT runs within each condition (for text prompts the prompt index is the class: the
    hard constraint, C²OT's infinite-weight limit). ``ot`` ignores the conditions when matching.
    """

    noise: torch.Tensor
    final: torch.Tensor
    coupling: Coupling = field(default_factory=Coupling)
    cond: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.coupling.check(len(self.noise), conditional=self.cond is not None)

    def draw(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` pairs (z0, x1), reproducible from ``gen``."""
        return self.draw_conditioned(gen, batch_size)[:2]

    def draw_conditioned(self, gen: torch.Generator,
                         batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`draw` with the pairs' condition indices (None: unconditional)."""
        n = len(self.noise)
        if self.coupling.kind == "independent":
            traj = torch.randint(0, n, (batch_size,), generator=gen)
            return self.noise[traj], self.final[traj], conditions_of(self.cond, traj)
        pool = self.coupling.pool_size(batch_size)
        tz = torch.randint(0, n, (pool,), generator=gen)
        tx = torch.randint(0, n, (pool,), generator=gen)
        z0, x1, c = self.noise[tz], self.final[tx], conditions_of(self.cond, tx)
        perm = self.coupling.couple(z0, x1, c)
        x1, c = x1[perm], conditions_of(c, perm)
        return z0[:batch_size], x1[:batch_size], None if c is None else c[:batch_size]

    def fixed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair once, in order (validation): the teacher's pairs, or their coupling OT batch by OT batch."""
        return self.fixed_conditioned()[:2]

    def fixed_conditioned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`fixed` with the pairs' condition indices (None: unconditional)."""
        perm = self.coupling.couple(self.noise, self.final, self.cond)
        return self.noise, self.final[perm], conditions_of(self.cond, perm)
