"""Teacher data for distillation: many-step teacher trajectories recorded at table nodes.

One teacher run serves every method, so that BOSS, reflow and k-step distillation see
exactly the same teacher samples (equal budget):

* the initial noise z0, the state at the model's σ_max (the top of the convention's
  ``sampling_range``: 1 for flow models, the VP/EDM σ_max) — *every* trajectory starts there,
  whatever the tables' first node,
* the states x_τ at the *nodes* of one or several timestep tables (the union of their
  sigmas, terminal 0 included), integrated on a fine grid that contains those nodes, so
  the recorded states are the teacher's own trajectory, not an interpolation,
* the final sample x(0) = ODE(z0).

A "free start" table (first node τ0 below σ_max, noise read as a later state, like
diffusers' ``leading`` spacing or a DP table with a free start) is sampled by placing the
noise at τ0. Its teacher is still the ODE from σ_max: the student is trained to make the jump
it will be asked to make, from the noise read at τ0 to the teacher's state at τ1 of the
trajectory that starts from that noise at σ_max (:class:`distill.boss.BOSSStraightening`).
Integrating the teacher from τ0 instead would teach the student the ODE from a mismatched start,
and its samples would drift from the teacher's.

The teacher is :mod:`schedules.teacher`'s, on the convention's reference grid (uniform in σ for
flow models, EDM ρ=7 for VP) merged with the table nodes (:func:`distill_teacher`); the solver is
Heun (default) or Euler (BOSS used 100-step Euler); its description is recorded with the data.
States are stored in the model's native ``x``; trainers convert to the solver's ODE coordinates
y = x / c(s) (see :mod:`schedules.solvers`).

The last ``val_fraction`` of the trajectories is held out (split by trajectory, so no
validation segment shares a trajectory with a training one).

Conditional models (:class:`schedules.conditioning.ConditionalAdapter`): trajectory *i* is the
teacher's guided ODE (D_u + w·(D_c − D_u), the adapter's own guided denoiser) under condition
*i mod P*; the micro-batches bind their sample indices, so the conditions stay aligned with the
noises, and the condition index of every trajectory is stored with it (``conditions``) so that
the student is trained on (x_τ, τ, condition) under the same guidance.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from distill.config import TEACHER_SOLVERS
from schedules.adapters import ModelAdapter
from schedules.conditioning import bind, conditioning_of, micro_batches
from schedules.io import StepsmithError, load_safetensors, save_safetensors
from schedules.table import TimestepTable
from schedules.teacher import Teacher, teacher_sample


@dataclass
class TeacherData:
    """Teacher trajectories at the table nodes.

    ``states[n, m]`` is trajectory ``n`` at sigma ``nodes[m]`` (``nodes`` strictly
    decreasing, ``nodes[0]`` = the model's σ_max, ``nodes[-1] = 0``); ``states[:, 0]`` is
    the noise z0 and ``states[:, -1]`` the teacher sample ODE(z0). ``teacher`` is the teacher's
    :meth:`~schedules.teacher.Teacher.describe`. ``conditions[n]`` is the condition index of
    trajectory ``n`` (conditional models; ``None`` for unconditional ones) and ``conditioning`` the
    :meth:`~schedules.conditioning.Conditioning.describe` it was generated under (guidance included).
    """

    states: torch.Tensor
    nodes: list[float]
    n_val: int
    fingerprint: str
    teacher_calls: int = 0
    teacher: dict = field(default_factory=dict)
    conditions: torch.Tensor | None = None
    conditioning: dict | None = None

    def __post_init__(self) -> None:
        if self.conditions is not None and self.conditions.shape != (self.n,):
            raise StepsmithError(f"teacher data: {tuple(self.conditions.shape)} condition indices for {self.n} "
                                 "trajectories; delete it to regenerate")

    def conditions_of(self, sl: slice) -> torch.Tensor | None:
        """The condition indices of the trajectories ``sl`` (None: unconditional)."""
        return None if self.conditions is None else self.conditions[sl]

    @property
    def n(self) -> int:
        return self.states.shape[0]

    @property
    def n_train(self) -> int:
        return self.n - self.n_val

    def split(self, split: str) -> slice:
        if split == "train":
            return slice(0, self.n_train)
        if split == "val":
            return slice(self.n_train, self.n)
        raise ValueError(split)

    @property
    def s_max(self) -> float:
        """The sigma every trajectory starts from (the noise's)."""
        return self.nodes[0]

    @property
    def noise(self) -> torch.Tensor:
        return self.states[:, 0]

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]

    def node_index(self, sigma: float) -> int:
        for i, v in enumerate(self.nodes):
            if math.isclose(v, sigma, rel_tol=1e-9, abs_tol=1e-12):
                return i
        raise KeyError(sigma)

    def save(self, path) -> None:
        meta = {"nodes": json.dumps(self.nodes), "n_val": str(self.n_val), "fingerprint": self.fingerprint,
                "teacher_calls": str(self.teacher_calls), "teacher": json.dumps(self.teacher),
                "conditioning": json.dumps(self.conditioning)}
        tensors = {"states": self.states}
        if self.conditions is not None:
            tensors["conditions"] = self.conditions
        save_safetensors(path, tensors, metadata=meta)

    @classmethod
    def load(cls, path) -> TeacherData:
        from safetensors import safe_open

        tensors = load_safetensors(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            return cls(states=tensors["states"], nodes=json.loads(meta["nodes"]), n_val=int(meta["n_val"]),
                       fingerprint=meta["fingerprint"], teacher_calls=int(meta.get("teacher_calls", 0)),
                       teacher=json.loads(meta.get("teacher", "{}")), conditions=tensors.get("conditions"),
                       conditioning=json.loads(meta.get("conditioning", "null")))
        except (KeyError, ValueError) as exc:
            raise StepsmithError(f"teacher data {path} is incomplete ({exc}); delete it to regenerate") from None


def table_nodes(tables: Sequence[TimestepTable]) -> list[float]:
    """Union of the tables' sigmas, strictly decreasing, terminal 0 included.

    The tables may start at different sigmas: every teacher trajectory starts at σ_max and each
    table's first step reads the noise at that table's own first node.
    """
    if not tables:
        raise StepsmithError("distillation needs at least one timestep table")
    return _distinct_descending(v for t in tables for v in t.sigmas)


def _distinct_descending(values) -> list[float]:
    nodes: list[float] = []
    for v in sorted(set(values), reverse=True):
        if not nodes or not math.isclose(v, nodes[-1], rel_tol=1e-9, abs_tol=1e-12):
            nodes.append(v)
    return nodes


def model_sigma_max(adapter: ModelAdapter) -> float:
    """The model's noise level: the top of its convention's sampling range."""
    return float(adapter.convention.sampling_range()[1])


def recorded_nodes(adapter: ModelAdapter, tables: Sequence[TimestepTable]) -> list[float]:
    """The sigmas the teacher data records: σ_max (the noise) followed by the tables' nodes."""
    nodes, s_max = table_nodes(tables), model_sigma_max(adapter)
    if nodes[0] > s_max * (1 + 1e-9):
        raise StepsmithError(f"a table starts at σ={nodes[0]:g}, above the model's σ_max {s_max:g}", param="table")
    return _distinct_descending([s_max, *nodes])


def fine_grid(adapter: ModelAdapter, nodes: Sequence[float], steps: int) -> list[float]:
    """The teacher's integration grid: the reference grid merged with the table nodes."""
    def near_node(v: float) -> bool:
        return any(math.isclose(v, u, rel_tol=1e-6, abs_tol=1e-9) for u in nodes)

    ref = [v for v in adapter.convention.reference_sigmas(steps) if v < nodes[0] and not near_node(v)]
    return sorted(set(ref) | set(nodes), reverse=True)


def distill_teacher(adapter: ModelAdapter, nodes: Sequence[float], steps: int, solver: str = "heun") -> Teacher:
    """The distillation teacher: ``solver`` along :func:`fine_grid`, so its states at the nodes are its own."""
    return Teacher.on_grid(fine_grid(adapter, nodes, steps), solver, label=f"reference-{steps}+nodes")


# bumped when the meaning of the recorded data changes (v2: every trajectory starts at σ_max)
DATA_VERSION = 2


def data_fingerprint(adapter: ModelAdapter, nodes: Sequence[float], n: int, seed: int, teacher_steps: int,
                     teacher_solver: str, val_fraction: float) -> str:
    """Identity of the teacher data for ``nodes`` (the tables' :func:`table_nodes`) and these settings."""
    key = json.dumps([DATA_VERSION, adapter.name, adapter.describe(), [round(v, 12) for v in nodes], n, seed,
                      teacher_steps, teacher_solver, val_fraction], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.no_grad()
def generate_teacher_data(adapter: ModelAdapter, tables: Sequence[TimestepTable], n: int, *, seed: int = 0,
                          teacher_steps: int = 100, teacher_solver: str = "heun", val_fraction: float = 0.1,
                          batch_size: int = 1024, progress: bool = False) -> TeacherData:
    """Run the teacher from ``n`` noises (``adapter.noise(n, seed)``) at σ_max and record the table nodes.

    A conditional ``adapter`` runs trajectory *i* under condition *i mod P* with its guidance, and the
    condition indices are recorded with the states."""
    if teacher_solver not in TEACHER_SOLVERS:
        raise StepsmithError(f"teacher solver {teacher_solver!r}: use one of {', '.join(TEACHER_SOLVERS)}")
    if n < 2:
        raise StepsmithError(f"--pairs {n}: need at least 2 teacher trajectories (10% are held out)")
    for t in tables:
        t.check_compatible(adapter.convention, adapter.prediction, what=adapter.name)
    nodes = recorded_nodes(adapter, tables)
    teacher = distill_teacher(adapter, nodes, teacher_steps, teacher_solver)
    noise = adapter.noise(n, seed)
    out = torch.empty((n, len(nodes), *adapter.sample_shape), dtype=torch.float32)
    calls0 = adapter.calls
    was_training = adapter.module.training
    adapter.module.eval()
    try:
        # One teacher run per micro-batch, written into ``out`` as it goes (the states of all n are held once).
        for sl in tqdm(micro_batches(n, batch_size), desc="teacher trajectories", disable=not progress, leave=False):
            with bind(sl):  # conditional models: the micro-batch keeps its samples' conditions
                run = teacher_sample(adapter, noise[sl], teacher, nodes=nodes)
            out[sl] = run.states.transpose(0, 1).float().cpu()
    finally:
        adapter.module.train(was_training)
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise StepsmithError(f"--pairs {n} leaves no training trajectories after holding out {n_val}")
    fp = data_fingerprint(adapter, table_nodes(tables), n, seed, teacher_steps, teacher_solver, val_fraction)
    cond = conditioning_of(adapter)
    return TeacherData(states=out, nodes=list(nodes), n_val=n_val, fingerprint=fp, teacher_calls=adapter.calls - calls0,
                       teacher=teacher.describe(),
                       conditions=None if cond is None else cond.condition_index(torch.arange(n)),
                       conditioning=None if cond is None else cond.describe())
