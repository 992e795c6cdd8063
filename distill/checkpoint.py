"""Checkpoints of a distillation run: ``<work>/ckpt-<step>`` folders.

Each holds ``accelerator.save_state`` (model, optimizer and RNG states, safetensors), the EMA
weights (``ema.safetensors``, the EMA's step count in the metadata) and ``meta.json`` (step and
loss history). A checkpoint is written to a hidden temporary folder and renamed when complete,
so a killed run leaves either a whole checkpoint or none; one that still fails to load (a
corrupted file, another model) is refused with a message that says what to delete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from schedules.io import StepsmithError, atomic_write_json, load_safetensors, save_safetensors

EMA_FILE = "ema.safetensors"
META_FILE = "meta.json"


def list_checkpoints(work: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``work`` as (step, folder), oldest first."""
    out = []
    for p in work.glob("ckpt-*"):
        if p.is_dir() and p.name[5:].isdigit():
            out.append((int(p.name[5:]), p))
    return sorted(out)


def latest_checkpoint(work: Path) -> Path | None:
    ckpts = list_checkpoints(work)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(work: Path, step: int, accelerator, ema, history: list[dict], keep: int,
                    cost: dict[str, float] | None = None) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed to ``ckpt-<step>`` when complete;
    only the newest ``keep`` checkpoints stay. ``cost`` (seconds spent so far) is kept so a resumed
    run reports the whole run's cost, not only its own part."""
    tmp = work / f".ckpt-{step:08d}.tmp"
    final = work / f"ckpt-{step:08d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in work.glob(".ckpt-*.tmp"):  # left by a run killed while checkpointing
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if main:
        if ema is not None:
            save_ema(tmp / EMA_FILE, ema)
        atomic_write_json(tmp / META_FILE, {"step": step, "history": history, "cost": cost or {}})
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(work)[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, accelerator, ema) -> tuple[int, list[dict], dict[str, float]]:
    """Restore the state saved in ``path`` (model, optimizer, RNG, EMA); returns (step, history, cost so far)."""
    step, history, cost = _read_meta(path)
    try:
        accelerator.load_state(str(path))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StepsmithError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first[:200]}); it is corrupt "
                             "or from another model — delete it to resume from an older one, or start without --resume"
                             ) from None
    if ema is not None:
        load_ema(path / EMA_FILE, ema, default_step=step)
    return step, history, cost


def _read_meta(path: Path) -> tuple[int, list[dict], dict[str, float]]:
    try:
        meta = json.loads((path / META_FILE).read_text())
        cost = {str(k): float(v) for k, v in dict(meta.get("cost") or {}).items()}
        return int(meta["step"]), list(meta["history"]), cost
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StepsmithError(f"checkpoint {path} is corrupt or incomplete ({type(exc).__name__}: {exc}); "
                             "delete it to resume from an older one, or start without --resume") from None


def save_ema(path: Path, ema) -> None:
    """The EMA's shadow weights as ``p0, p1, ...`` and its step count (a diffusers ``EMAModel``)."""
    save_safetensors(path, {f"p{i}": t for i, t in enumerate(ema.shadow_params)},
                     metadata={"optimization_step": str(ema.optimization_step)})


def load_ema(path: Path, ema, default_step: int) -> None:
    """Restore what :func:`save_ema` wrote into ``ema`` (shadow weights keep their device and dtype)."""
    from safetensors import safe_open

    shadow = load_safetensors(path)
    with safe_open(str(path), framework="pt") as fh:
        ema_step = int((fh.metadata() or {}).get("optimization_step", default_step))
    if len(shadow) != len(ema.shadow_params):
        raise StepsmithError(f"checkpoint {path.parent}: EMA holds {len(shadow)} tensors, the model "
                             f"{len(ema.shadow_params)}; the checkpoint is from another model or LoRA setting")
    state: dict[str, Any] = {
        "optimization_step": ema_step,
        "shadow_params": [shadow[f"p{i}"].to(t.device, t.dtype) for i, t in enumerate(ema.shadow_params)],
    }
    ema.load_state_dict(state)
