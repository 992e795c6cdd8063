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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from schedules.distributed import current_dist
from schedules.io import StepsmithError, atomic_torch_save, check_output_path

VERSION = 1


def checkpoint_format(method: str) -> str:
    return f"stepsmith-{method}-checkpoint"


def checkpoint_key(adapter, **fields) -> str:
    """What a checkpoint must match to be resumed, as a short hash: the model, its conditioning (condition set,
    guidance, size: the saved errors and fitness values hold only for them) and ``fields`` (the method, budgets,
    solver and every search option). Every resumable search (dp, ays, evolution) keys its checkpoint with it."""
    cond = getattr(adapter, "conditioning", None)
    extra = {} if cond is None else {"conditioning": cond.describe()}
    src = json.dumps({"model": getattr(adapter, "name", None), **extra, **fields}, sort_keys=True, default=repr)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def tensor_key(x: torch.Tensor) -> str:
    """A tensor's content as a short hash (data a search's errors hold for)."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(json.dumps(list(x.shape)).encode() + x.numpy().tobytes()).hexdigest()[:16]


def cost_counter(adapter, earlier: dict) -> Callable[[], dict]:
    """``spent()``: model calls and seconds since now plus ``earlier`` (what the runs a search resumes spent)."""
    calls0, t0 = getattr(adapter, "calls", 0), time.perf_counter()
    prev_calls, prev_s = int(earlier.get("model_calls", 0)), float(earlier.get("seconds", 0.0))

    def spent() -> dict:
        return {"model_calls": prev_calls + getattr(adapter, "calls", 0) - calls0,
                "seconds": round(prev_s + time.perf_counter() - t0, 3)}

    return spent


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
    spent: Callable[[], dict] = dict  # the whole search's cost so far, this run and the ones it resumed

    @property
    def resumed(self) -> bool:
        return bool(self.earlier)

    def save(self) -> None:
        if self.path is None or not current_dist().main:
            return
        atomic_torch_save(self.path, {"format": checkpoint_format(self.method), "version": VERSION, "key": self.key,
                                      "state": self.state, "spent": self.spent()})


def open_checkpoint(checkpoint: str | Path | None, method: str, key: str, adapter) -> SearchCheckpoint:
    """The checkpoint of this search: read from ``checkpoint`` when the file exists (refused when it is not this
    search's), else empty. ``checkpoint=None`` gives one that never writes."""
    if checkpoint is None:
        return SearchCheckpoint(None, method, key, spent=cost_counter(adapter, {}))
    if not isinstance(checkpoint, (str, Path)) or not str(checkpoint).strip():
        raise StepsmithError(f"`checkpoint` must be a file path, got {checkpoint!r}", param="checkpoint")
    path = check_output_path(checkpoint, param="checkpoint")
    saved = read_checkpoint(path, method, key)
    if saved is None:
        return SearchCheckpoint(path, method, key, spent=cost_counter(adapter, {}))
    earlier = saved.get("spent") if isinstance(saved.get("spent"), dict) else {"model_calls": 0}
    return SearchCheckpoint(path, method, key, saved["state"], earlier, cost_counter(adapter, earlier))


__all__ = ["SearchCheckpoint", "checkpoint_format", "checkpoint_key", "cost_counter", "open_checkpoint",
           "read_checkpoint", "tensor_key"]
