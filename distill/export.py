"""Writing and reading distilled model folders.

Layout of an output folder ``OUT/``:

* diffusers models (a pipeline folder, or ``builtin:digits-*``): a copy of the pipeline
  folder with the denoiser component (``unet``/``transformer``) replaced by the distilled
  weights (``save_pretrained``, safetensors) — load it like the original
  (``stepsmith sample --model OUT``, ``load_model("OUT")``, ``DiffusionPipeline``-style). A
  bare model folder (``config.json`` + scheduler) gives ``OUT/config.json``,
  ``OUT/diffusion_pytorch_model.safetensors`` and ``OUT/scheduler/``;
* ``file.py:attr`` models and ``builtin:toy2d-flow``: ``OUT/model.safetensors``, the
  module's full state dict (LoRA merged), loadable with ``module.load_state_dict``
  (``load_model("file.py:attr", weights="OUT/model.safetensors", ...)``);
* always: ``OUT/table.json`` (the table it was straightened for; further budgets as
  ``table-<K>.json``), ``OUT/distill.json`` (method, hyper-parameters, losses, the
  command) and ``OUT/loss.log``.

The folder is built beside ``OUT`` and renamed into place; an existing non-empty ``OUT``
is only replaced with ``overwrite=True``. :func:`load_distilled` reads any of them back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from schedules.adapters import ModelAdapter, load_model
from schedules.embedded import embedded_path
from schedules.io import StepsmithError, atomic_write_json, save_safetensors
from schedules.table import TimestepTable

INFO_FILE = "distill.json"


def check_output_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StepsmithError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a finished distilled model" if (out / INFO_FILE).is_file() else "files"
        raise StepsmithError(f"--out {out} already holds {what}; choose another folder or pass --overwrite")


def _is_diffusers(module: torch.nn.Module) -> bool:
    """A diffusers ``ModelMixin`` (checked by class, without importing diffusers)."""
    return any(c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers") for c in type(module).__mro__)


def _source_folder(adapter: ModelAdapter) -> Path | None:
    name = adapter.name
    if name.startswith("builtin:"):
        p = embedded_path(name.split(":", 1)[1])
        return p if (p / "model_index.json").is_file() else None
    p = Path(name)
    return p if p.is_dir() else None


def _component(index: dict) -> str:
    comp = next((c for c in ("unet", "transformer", "prior") if c in index), None)
    if comp is None:
        raise StepsmithError("the pipeline index has no unet or transformer component")
    return comp


def export_model(adapter: ModelAdapter, module: torch.nn.Module, tables: Sequence[TimestepTable], out: Path,
                 info: dict[str, Any], history: list[dict], *, overwrite: bool = False,
                 loss_log: Path | None = None) -> Path:
    """Write the output folder atomically (build beside it, then rename)."""
    out = Path(out)
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    module = module.to("cpu")
    load: dict[str, Any] = {"teacher": adapter.name, "prediction": adapter.prediction,
                            "shape": list(adapter.sample_shape)}
    try:
        src = _source_folder(adapter)
        if _is_diffusers(module) and src is not None and (src / "model_index.json").is_file():
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("training.json", "*.tmp", ".*"))
            comp = _component(json.loads((src / "model_index.json").read_text()))
            shutil.rmtree(tmp / comp, ignore_errors=True)
            module.save_pretrained(tmp / comp, safe_serialization=True)
            load["format"] = "diffusers-pipeline"
        elif _is_diffusers(module):
            tmp.mkdir(parents=True)
            module.save_pretrained(tmp, safe_serialization=True)
            if adapter.scheduler_config is not None:
                atomic_write_json(tmp / "scheduler" / "scheduler_config.json", adapter.scheduler_config)
            load["format"] = "diffusers-model"
        else:
            tmp.mkdir(parents=True)
            save_safetensors(tmp / "model.safetensors", module.state_dict(),
                             metadata={"teacher": adapter.name, "method": str(info.get("method", {}).get("method"))})
            if adapter.scheduler_config is not None:
                atomic_write_json(tmp / "scheduler" / "scheduler_config.json", adapter.scheduler_config)
            load["format"] = "state-dict"
        tables[0].save(tmp / "table.json")
        for t in tables[1:]:
            t.save(tmp / f"table-{t.steps}.json")
        atomic_write_json(tmp / INFO_FILE, {**info, "load": load, "history": history})
        if loss_log is not None and loss_log.is_file():
            shutil.copyfile(loss_log, tmp / "loss.log")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_distilled(out: str | Path, device: str = "cpu") -> ModelAdapter:
    """The distilled model in ``out`` as a :class:`ModelAdapter` (same convention as its teacher)."""
    out = Path(out)
    info_file = out / INFO_FILE
    if not info_file.is_file():
        raise StepsmithError(f"{out} is not a stepsmith distill output (no {INFO_FILE})")
    try:
        load = json.loads(info_file.read_text())["load"]
    except (json.JSONDecodeError, KeyError):
        raise StepsmithError(f"{info_file} is corrupt; rerun stepsmith distill") from None
    fmt = load.get("format")
    if fmt in ("diffusers-pipeline", "diffusers-model"):
        return load_model(str(out), device=device)
    teacher = load["teacher"]
    weights = out / "model.safetensors"
    if teacher.startswith("builtin:"):
        from schedules.adapters import load_state_dict
        from schedules.io import load_safetensors

        adapter = load_model(teacher, device=device)
        load_state_dict(adapter.module, load_safetensors(weights), str(weights))
        adapter.module.to(device)
        adapter.name = f"{teacher}@{out}"
        return adapter
    sched = out / "scheduler" if (out / "scheduler" / "scheduler_config.json").is_file() else None
    adapter = load_model(teacher, prediction=load["prediction"], shape=tuple(load["shape"]), scheduler_config=sched,
                         weights=weights, device=device)
    adapter.name = f"{teacher}@{out}"
    return adapter
