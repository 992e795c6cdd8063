"""The teacher: the one many-step reference sampler that every "distance to the teacher" is measured against.

Search (dp, evolution, ays), evaluation and distillation all draw their reference samples — and, on
request, the teacher's states at given nodes — from :func:`teacher_sample`, so that a table's
``objective_kind`` and a report's teacher row name the same thing: a :class:`Teacher` (solver, grid,
steps) recorded in provenance by :meth:`Teacher.describe`.

Grids: ``"reference"`` is the convention's own fine grid (:meth:`Convention.reference_sigmas`:
uniform in σ for flow models, EDM ρ=7 for VP); an explicit ``sigmas`` tuple (a search grid, a grid
merged with a table's nodes) is used as given, with ``label`` naming where it came from.
The teacher integrates from the first sigma of its grid (σ_max) down to 0 and, like every
sampler here, evaluates the model at every node but the terminal 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from schedules.conditioning import bind, micro_batches
from schedules.io import StepsmithError
from schedules.solvers import check_sigmas, get_solver, sample

DEFAULT_TEACHER_STEPS = 200


@dataclass(frozen=True)
class Teacher:
    """A reference sampler: ``solver`` along ``steps`` steps of a grid (the convention's, or ``sigmas``)."""

    solver: str = "heun"
    steps: int = DEFAULT_TEACHER_STEPS
    sigmas: tuple[float, ...] | None = None
    label: str = "reference"

    def __post_init__(self) -> None:
        get_solver(self.solver)
        if self.sigmas is not None:
            check_sigmas(list(self.sigmas))
            object.__setattr__(self, "steps", len(self.sigmas) - 1)
        elif not isinstance(self.steps, int) or self.steps < 1:
            raise StepsmithError(f"teacher steps must be a positive integer, got {self.steps!r}")

    @classmethod
    def on_grid(cls, sigmas: Sequence[float], solver: str = "heun", label: str = "grid") -> Teacher:
        """A teacher that integrates along an explicit descending sigma list ending in 0."""
        return cls(solver=solver, sigmas=tuple(float(v) for v in sigmas), label=label)

    def grid(self, conv) -> list[float]:
        """The sigmas this teacher integrates along, for a model of convention ``conv``."""
        if self.sigmas is not None:
            return list(self.sigmas)
        return conv.reference_sigmas(self.steps)

    @property
    def nfe(self) -> int:
        return get_solver(self.solver).nfe(self.steps)

    @property
    def name(self) -> str:
        """Short name used in objective kinds and report rows, e.g. ``heun-200@reference``."""
        return f"{self.solver}-{self.steps}@{self.label}"

    def describe(self) -> dict:
        """What provenance records about the teacher."""
        return {"solver": self.solver, "steps": self.steps, "grid": self.label, "nfe": self.nfe, "name": self.name}


DEFAULT_TEACHER = Teacher()


@dataclass
class TeacherRun:
    """Final samples and, when nodes were asked for, the teacher's states and denoised values there.

    ``states[k]`` is the state at ``nodes[k]`` ([len(nodes), B, ...]); ``denoised[k]`` is D(states[k], nodes[k])
    for every node but the terminal 0 (whose entry is the final sample itself).
    """

    x: torch.Tensor
    teacher: Teacher
    nodes: list[float] = field(default_factory=list)
    states: torch.Tensor | None = None
    denoised: torch.Tensor | None = None


def _node_positions(grid: list[float], nodes: Sequence[float]) -> list[int]:
    """Index of every node on the teacher's grid; a node off the grid is an error, not an interpolation."""
    exact = {g: i for i, g in reversed(list(enumerate(grid)))}  # grids built from the nodes hold them exactly
    out = []
    for v in nodes:
        if float(v) in exact:
            out.append(exact[float(v)])
            continue
        hits = [i for i, g in enumerate(grid) if math.isclose(g, float(v), rel_tol=1e-9, abs_tol=1e-12)]
        if not hits:
            raise StepsmithError(f"node σ={float(v):g} is not on the teacher's grid ({len(grid)} sigmas); "
                                 "build the teacher with Teacher.on_grid(...) on a grid that contains the nodes")
        out.append(hits[0])
    return out


@torch.no_grad()
def _run_batch(denoiser, noise: torch.Tensor, teacher: Teacher, grid: list[float], pos: list[int], progress: bool):
    states: dict[int, torch.Tensor] = {}
    denoised: dict[int, torch.Tensor] = {}
    wanted = set(pos)

    def record(i: int, _s: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i in wanted:
            states[i], denoised[i] = x, x0

    x = sample(denoiser, noise, grid, teacher.solver, progress=progress, callback=record if pos else None)
    last = len(grid) - 1
    if last in wanted:
        states[last], denoised[last] = x, x
    return x, states, denoised


@torch.no_grad()
def teacher_sample(denoiser, noise: torch.Tensor, teacher: Teacher = DEFAULT_TEACHER, *, batch_size: int | None = None,
                   nodes: Sequence[float] | None = None, progress: bool = False,
                   on_batch: Callable[[int], None] | None = None) -> TeacherRun:
    """Integrate ``noise`` (the state at the teacher grid's first sigma) to σ=0 with the teacher.

    ``batch_size`` splits the noises into micro-batches (``on_batch(n_done)`` after each); ``nodes``
    asks for the states (and denoised values) at those sigmas, which must lie on the teacher's grid.
    """
    grid = teacher.grid(denoiser.convention)
    pos = _node_positions(grid, nodes) if nodes is not None else []
    xs, sts, dns = [], [], []
    slices = micro_batches(len(noise), batch_size)
    for sl in tqdm(slices, desc=f"teacher ({teacher.name})", disable=not progress or len(slices) == 1, leave=False):
        with bind(sl):  # conditional models: sample i of the batch keeps condition i mod P
            x, st, dn = _run_batch(denoiser, noise[sl], teacher, grid, pos, progress and len(slices) == 1)
        xs.append(x)
        if pos:
            sts.append(torch.stack([st[p] for p in pos]))
            dns.append(torch.stack([dn[p] for p in pos]))
        if on_batch is not None:
            on_batch(sl.stop)
    x = torch.cat(xs) if xs else noise
    if not pos:
        return TeacherRun(x, teacher)
    return TeacherRun(x, teacher, [float(v) for v in nodes], torch.cat(sts, dim=1), torch.cat(dns, dim=1))


__all__ = ["DEFAULT_TEACHER", "DEFAULT_TEACHER_STEPS", "Teacher", "TeacherRun", "teacher_sample"]
