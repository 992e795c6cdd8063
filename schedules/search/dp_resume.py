"""Resumable ``dp`` searches (option ``checkpoint=PATH``).

A dp search with a checkpoint saves its state to that file, atomically (a killed run leaves the last
state whole), at every point where work would otherwise be lost:

* after the shared pass: the teacher-DP and student-DP paths and costs of every budget, the teacher's
  final samples, and the pass's calls and seconds (the cost matrices and teacher states are not kept:
  nothing after the pass reads them);
* after the start rollouts of a budget: each start's final error;
* after every node search of the refinement: the whole coordinate-descent state
  (:func:`~schedules.search.dp.refine_final_error`'s ``on_node``);
* after each finished budget: its table.

The same search started again with the same checkpoint goes on from there and ends with exactly the
tables an uninterrupted run writes: the node states of the path being refined are rebuilt by one
rollout of it (K model calls, the only work done twice), and rollouts are deterministic for the same
noise and path. The file is a torch file read back with ``weights_only=True`` (never unpickled). A
checkpoint of another search — model, conditioning (conditions, guidance, size), budgets, solver,
seed, samples or any option — is refused, as is a file that is not a dp checkpoint. Under
``accelerate launch`` every rank runs the same refinement; only the main process writes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from schedules.distributed import current_dist
from schedules.io import StepsmithError, atomic_torch_save, check_output_path

FORMAT = "stepsmith-dp-checkpoint"
VERSION = 1


def search_key(adapter, nfes: list[int], solver: str, **options) -> str:
    """What a checkpoint must match to be resumed: the model, its conditioning (its costs and errors hold
    only for it), the budgets, the solver and every search option."""
    cond = getattr(adapter, "conditioning", None)
    extra = {} if cond is None else {"conditioning": cond.describe()}
    src = json.dumps({"method": "dp", "model": adapter.name, "nfe": list(nfes), "solver": solver, **extra,
                      **options}, sort_keys=True, default=repr)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _refuse(path: Path, why: str) -> StepsmithError:
    return StepsmithError(f"checkpoint {path} {why}; delete it to start over or choose another checkpoint path",
                          param="checkpoint")


def read_dp_checkpoint(path: Path, key: str) -> dict | None:
    """The state saved in ``path`` (``None``: no checkpoint yet); refused, with what to do, when it is not a
    dp checkpoint or belongs to another search."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or a pickle with objects weights_only refuses
        raise _refuse(path, f"is corrupt or not a dp checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _refuse(path, "is not a dp checkpoint")
    if state.get("version") != VERSION:
        raise _refuse(path, f"has format version {state.get('version')!r}; this stepsmith reads version {VERSION}")
    if state.get("key") != key:
        raise _refuse(path, "belongs to another search (model, conditioning, nfe, solver, seed, samples or options)")
    if not isinstance(state.get("tables"), dict) or not isinstance(state.get("finish"), dict):
        raise _refuse(path, "is corrupt")
    return state


@dataclass
class DPCheckpoint:
    """A dp search's saved state and where it goes (:func:`open_checkpoint`; module docstring)."""

    path: Path | None
    key: str
    shared: dict | None = None  # the shared pass (None: not run yet)
    tables: dict[int, dict] = field(default_factory=dict)  # finished budgets' tables (TimestepTable.to_dict)
    finish: dict[int, dict] = field(default_factory=dict)  # per budget: start errors, refined starts, node state
    earlier: dict = field(default_factory=dict)  # model calls and seconds of the runs this one resumes
    _calls0: int = 0
    _t0: float = 0.0
    _adapter: object = None

    @property
    def resumed(self) -> bool:
        return bool(self.earlier)

    def spent(self) -> dict:
        """Model calls and seconds of the whole search so far, this run and the ones it resumed."""
        return {"model_calls": int(self.earlier.get("model_calls", 0)) + getattr(self._adapter, "calls", 0)
                - self._calls0, "seconds": round(float(self.earlier.get("seconds", 0.0))
                                                 + time.perf_counter() - self._t0, 3)}

    def budget(self, nfe: int) -> dict:
        """The refinement state of budget ``nfe`` (created empty)."""
        return self.finish.setdefault(nfe, {"errs": None, "results": {}, "node": {}, "calls": 0, "rebuild": 0,
                                            "out_of_calls": False})

    def save(self) -> None:
        if self.path is None or not current_dist().main:
            return
        atomic_torch_save(self.path, {"format": FORMAT, "version": VERSION, "key": self.key, "shared": self.shared,
                                      "tables": self.tables, "finish": self.finish, "spent": self.spent()})


def open_checkpoint(checkpoint: str | Path | None, key: str, adapter) -> DPCheckpoint:
    """The checkpoint of this search: read from ``checkpoint`` when the file exists (refused when it is not
    this search's), else empty. ``checkpoint=None`` gives a checkpoint that never writes."""
    if checkpoint is None:
        return DPCheckpoint(None, key, _calls0=getattr(adapter, "calls", 0), _t0=time.perf_counter(),
                            _adapter=adapter)
    if not isinstance(checkpoint, (str, Path)) or not str(checkpoint).strip():
        raise StepsmithError(f"`checkpoint` must be a file path, got {checkpoint!r}", param="checkpoint")
    path = check_output_path(checkpoint, param="checkpoint")
    state = read_dp_checkpoint(path, key) or {}
    spent = state.get("spent")
    return DPCheckpoint(path, key, state.get("shared"), dict(state.get("tables", {})), dict(state.get("finish", {})),
                        spent if isinstance(spent, dict) and state else {}, getattr(adapter, "calls", 0),
                        time.perf_counter(), adapter)


__all__ = ["DPCheckpoint", "open_checkpoint", "read_dp_checkpoint", "search_key"]
