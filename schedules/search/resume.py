"""Resumable searches (option ``checkpoint=PATH`` of ``dp`` and ``ays``; ``evolution`` keeps its own JSON file).

A search with a checkpoint saves its state to that file, atomically (a killed run leaves the last state whole),
wherever work would otherwise be lost; the same search started again with the same checkpoint goes on from there
and ends with exactly the tables an uninterrupted run writes. What each method saves, and what it computes twice
on a resume, is in its module (:mod:`schedules.search.dp_method`, :mod:`schedules.search.ays`).

The file is a torch file read back with ``weights_only=True`` (never unpickled). A checkpoint of another search
— model, conditioning (conditions, guidance, size), budgets, solver, seed, samples, data or any option — is
refused, as is a file that is not a checkpoint of the method. Under ``accelerate launch`` every rank runs the same
search after the shared passes; only the main process writes.
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

VERSION = 1


def checkpoint_format(method: str) -> str:
    return f"stepsmith-{method}-checkpoint"


def search_key(adapter, method: str, nfes: list[int], solver: str, **options) -> str:
    """What a checkpoint must match to be resumed: the method, the model, its conditioning (the saved errors hold
    only for it), the budgets, the solver and every search option."""
    cond = getattr(adapter, "conditioning", None)
    extra = {} if cond is None else {"conditioning": cond.describe()}
    src = json.dumps({"method": method, "model": getattr(adapter, "name", None), "nfe": list(nfes), "solver": solver,
                      **extra, **options}, sort_keys=True, default=repr)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def tensor_key(x: torch.Tensor) -> str:
    """A tensor's content as a short hash (data a search's errors hold for)."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(json.dumps(list(x.shape)).encode() + x.numpy().tobytes()).hexdigest()[:16]


def _refuse(path: Path, why: str) -> StepsmithError:
    return StepsmithError(f"checkpoint {path} {why}; delete it to start over or choose another checkpoint path",
                          param="checkpoint")


def read_checkpoint(path: Path, method: str, key: str) -> dict | None:
    """The state saved in ``path`` (``None``: no checkpoint yet); refused, with what to do, when it is not a
    checkpoint of ``method`` or belongs to another search."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or a pickle with objects weights_only refuses
        raise _refuse(path, f"is corrupt or not a checkpoint of method {method} ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != checkpoint_format(method):
        raise _refuse(path, f"is not a checkpoint of method {method}")
    if saved.get("version") != VERSION:
        raise _refuse(path, f"has format version {saved.get('version')!r}; this stepsmith reads version {VERSION}")
    if saved.get("key") != key:
        raise _refuse(path, "belongs to another search (model, conditioning, nfe, solver, seed, samples or options)")
    if not isinstance(saved.get("state"), dict):
        raise _refuse(path, "is corrupt")
    return saved


@dataclass
class SearchCheckpoint:
    """A search's saved ``state`` (method-specific: plain containers, numbers and tensors) and where it goes."""

    path: Path | None
    method: str
    key: str
    state: dict = field(default_factory=dict)
    earlier: dict = field(default_factory=dict)  # model calls and seconds of the runs this one resumes
    _calls0: int = 0
    _t0: float = 0.0
    _adapter: object = None

    @property
    def resumed(self) -> bool:
        return bool(self.earlier)

    def spent(self) -> dict:
        """Model calls and seconds of the whole search so far, this run and the ones it resumed."""
        calls = int(self.earlier.get("model_calls", 0)) + getattr(self._adapter, "calls", 0) - self._calls0
        return {"model_calls": calls,
                "seconds": round(float(self.earlier.get("seconds", 0.0)) + time.perf_counter() - self._t0, 3)}

    def save(self) -> None:
        if self.path is None or not current_dist().main:
            return
        atomic_torch_save(self.path, {"format": checkpoint_format(self.method), "version": VERSION, "key": self.key,
                                      "state": self.state, "spent": self.spent()})


def open_checkpoint(checkpoint: str | Path | None, method: str, key: str, adapter) -> SearchCheckpoint:
    """The checkpoint of this search: read from ``checkpoint`` when the file exists (refused when it is not this
    search's), else empty. ``checkpoint=None`` gives one that never writes."""
    calls0, t0 = getattr(adapter, "calls", 0), time.perf_counter()
    if checkpoint is None:
        return SearchCheckpoint(None, method, key, _calls0=calls0, _t0=t0, _adapter=adapter)
    if not isinstance(checkpoint, (str, Path)) or not str(checkpoint).strip():
        raise StepsmithError(f"`checkpoint` must be a file path, got {checkpoint!r}", param="checkpoint")
    path = check_output_path(checkpoint, param="checkpoint")
    saved = read_checkpoint(path, method, key)
    if saved is None:
        return SearchCheckpoint(path, method, key, _calls0=calls0, _t0=t0, _adapter=adapter)
    spent = saved.get("spent")
    return SearchCheckpoint(path, method, key, saved["state"], spent if isinstance(spent, dict) else {"model_calls": 0},
                            calls0, t0, adapter)


__all__ = ["SearchCheckpoint", "checkpoint_format", "open_checkpoint", "read_checkpoint", "search_key", "tensor_key"]
