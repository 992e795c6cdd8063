"""Writing and reading distilled model folders.

Layout of an output folder ``OUT/``:

* diffusers models (a pipeline folder, ``builtin:digits-*``, or a pipeline adapter built in
  Python, whose pipeline is saved with ``save_pretrained``): a copy of the pipeline
  folder with the denoiser component (``unet``/``transformer``) replaced by the distilled
  weights (``save_pretrained``, safetensors) — load it like the original
  (``stepsmith sample --model OUT``, ``load_model("OUT")``, ``DiffusionPipeline``-style). A
  bare model folder (``config.json`` + scheduler) gives ``OUT/config.json``,
  ``OUT/diffusion_pytorch_model.safetensors`` and ``OUT/scheduler/``;
* ``file.py:attr`` models and ``builtin:toy2d-flow``: ``OUT/model.safetensors``, the
  module's full state dict (LoRA merged), loadable with ``module.load_state_dict``
  (``load_model("file.py:attr", weights="OUT/model.safetensors", ...)``);
* pipeline models (SD, SDXL, SD3, Flux folders) trained with LoRA (``lora_rank`` > 0): also
  ``OUT/lora/pytorch_lora_weights.safetensors``, the unfused LoRA factors written by the pipeline
  class's own ``save_lora_weights`` — ``pipe.load_lora_weights("OUT/lora")`` on the original
  pipeline gives the distilled denoiser. A pipeline whose class has no LoRA format (DiT) is refused
  before training (:func:`check_lora_export`);
* conditional models: ``distill.json`` records the conditioning the student was trained under
  (classes or prompts, guidance scale), and :func:`load_distilled` loads it back under it;
* always: ``OUT/table.json`` (the table it was straightened for; further budgets as
  ``table-<K>.json``), ``OUT/distill.json`` (method, hyper-parameters, losses, the
  command) and ``OUT/loss.log``.

The folder is built beside ``OUT`` and renamed into place; an existing non-empty ``OUT``
is only replaced with ``overwrite=True``. :func:`load_distilled` reads any of them back.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from distill.student import LoraWeights
from schedules.adapters import ModelAdapter, load_model
from schedules.conditioning import Conditioning, conditioning_from_record, conditioning_of, conditioning_record
from schedules.embedded import embedded_path
from schedules.io import StepsmithError, atomic_write_json, save_safetensors
from schedules.table import TimestepTable

INFO_FILE = "distill.json"
LORA_DIR = "lora"


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


def pipeline_class_name(adapter: ModelAdapter) -> str | None:
    """The diffusers pipeline class of a pipeline model (the pipeline the adapter was built from, else the
    registered pipeline class its source folder names); None for every other model."""
    pipe = getattr(adapter, "pipeline", None)
    if pipe is not None:
        return type(pipe).__name__
    src = _source_folder(adapter)
    if src is None:
        return None
    from schedules.adapters import registered_pipeline

    return registered_pipeline(src)


def _pipeline_component(adapter: ModelAdapter) -> str:
    pipe = getattr(adapter, "pipeline", None)
    if pipe is not None:
        return "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    return _component(json.loads((_source_folder(adapter) / "model_index.json").read_text()))


def lora_saver(class_name: str, component: str) -> Callable[..., Any] | None:
    """``<Pipeline>.save_lora_weights`` when the pipeline class saves LoRA layers of ``component``, else None."""
    import diffusers

    save = getattr(getattr(diffusers, class_name, None), "save_lora_weights", None)
    if save is None or f"{component}_lora_layers" not in inspect.signature(save).parameters:
        return None
    return save


def check_lora_export(adapter: ModelAdapter, lora_rank: int) -> None:
    """Refuse LoRA on a pipeline model whose LoRA weights cannot be written for ``load_lora_weights``
    (before any teacher call or file). Models that are not pipelines export their merged weights only."""
    if lora_rank <= 0:
        return
    cls = pipeline_class_name(adapter)
    if cls is None:
        return
    from distill.student import has_diffusers_lora

    comp = _pipeline_component(adapter)
    if lora_saver(cls, comp) is None or not has_diffusers_lora(adapter.module):
        raise StepsmithError(f"`lora_rank` {lora_rank}: LoRA weights of a {cls} cannot be exported (diffusers' {cls} "
                             f"has no save_lora_weights / load_lora_weights for its {comp}; LoRA export supports "
                             "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline and "
                             "FluxPipeline); use full fine-tuning (`lora_rank` 0)", param="lora_rank")


def requested_conditioning(adapter: ModelAdapter) -> Conditioning | None:
    """The conditioning a model was asked for: a pipeline adapter's prompt ``pipeline_conditioning`` (what its
    builder was given) where present, else the adapter's own. A pipeline adapter's own prompt conditioning is
    resolved for its run (an SDXL negative prompt left out becomes "", guided by zeros under
    ``force_zeros_for_empty_prompt``; Flux's embedded guidance becomes its CFG scale): rebuilt from that, a student
    would guide differently from its teacher (:func:`schedules.conditioning.with_guidance` rebuilds from the request
    for the same reason). Class conditioning resolves without loss (``'all'`` to the labels, the null class made
    explicit), so the resolved one is recorded."""
    asked = getattr(adapter, "pipeline_conditioning", None)
    return asked if asked is not None and asked.kind == "prompt" else conditioning_of(adapter)


def student_table(table: TimestepTable, adapter: ModelAdapter) -> TimestepTable:
    """``table`` as the student's: valid for the conditioning the student was trained under (a table searched at
    guidance 3 and distilled at 5 makes a guidance-5 student), the table's own kept as ``searched_conditioning``."""
    cond = conditioning_of(adapter)
    trained = None if cond is None else cond.describe()
    if trained is None or table.conditioning == trained:
        return table
    prov = dict(table.provenance)
    if table.conditioning is not None:
        prov["searched_conditioning"] = table.conditioning
    return dataclasses.replace(table, conditioning=trained, provenance=prov)


def export_model(adapter: ModelAdapter, module: torch.nn.Module, tables: Sequence[TimestepTable], out: Path,
                 info: dict[str, Any], history: list[dict], *, overwrite: bool = False,
                 loss_log: Path | None = None, lora: LoraWeights | None = None) -> Path:
    """Write the output folder atomically (build beside it, then rename); ``lora`` (LoRA factors in diffusers'
    naming) is also written in the pipeline's LoRA format."""
    out = Path(out)
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    module = module.to("cpu")
    load: dict[str, Any] = {"teacher": adapter.name, "prediction": adapter.prediction,
                            "shape": list(adapter.sample_shape),
                            "conditioning": conditioning_record(requested_conditioning(adapter))}
    if getattr(adapter, "pipeline_options", None):  # e.g. the T5 length the student's prompt embeddings had
        load["pipeline_options"] = dict(adapter.pipeline_options)
    try:
        src = _source_folder(adapter)
        if _is_diffusers(module) and src is not None and (src / "model_index.json").is_file():
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("training.json", "*.tmp", ".*"))
            comp = _component(json.loads((src / "model_index.json").read_text()))
            shutil.rmtree(tmp / comp, ignore_errors=True)
            module.save_pretrained(tmp / comp, safe_serialization=True)
            load["format"] = "diffusers-pipeline"
        elif _is_diffusers(module) and getattr(adapter, "pipeline", None) is not None:
            # a pipeline built in Python (no source folder): the pipeline saved, its denoiser replaced
            adapter.pipeline.save_pretrained(tmp, safe_serialization=True)
            comp = _pipeline_component(adapter)
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
        if lora is not None and pipeline_class_name(adapter) is not None:
            cls, comp = pipeline_class_name(adapter), _pipeline_component(adapter)
            save = lora_saver(cls, comp)
            if save is None:
                raise StepsmithError(f"{cls} has no LoRA format for its {comp}")  # refused before training
            kw: dict[str, Any] = {f"{comp}_lora_layers": lora.layers}
            if f"{comp}_lora_adapter_metadata" in inspect.signature(save).parameters:
                kw[f"{comp}_lora_adapter_metadata"] = lora.config  # the rank and alpha load_lora_weights rebuilds
            save(str(tmp / LORA_DIR), **kw, safe_serialization=True)
            load["lora"] = LORA_DIR
        tables = [student_table(t, adapter) for t in tables]
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


def load_distilled(out: str | Path, device: str = "cpu", conditioning: Conditioning | None = None) -> ModelAdapter:
    """The distilled model in ``out`` as a :class:`ModelAdapter` (same convention as its teacher).

    A conditional model comes back under the conditioning it was trained under (classes or prompts and the
    guidance scale baked into the student) unless ``conditioning`` says otherwise."""
    out = Path(out)
    info_file = out / INFO_FILE
    if not info_file.is_file():
        raise StepsmithError(f"{out} is not a stepsmith distill output (no {INFO_FILE})")
    try:
        load = json.loads(info_file.read_text())["load"]
    except (json.JSONDecodeError, KeyError):
        raise StepsmithError(f"{info_file} is corrupt; rerun stepsmith distill") from None
    fmt = load.get("format")
    cond = conditioning if conditioning is not None else conditioning_from_record(load.get("conditioning"))
    if fmt in ("diffusers-pipeline", "diffusers-model"):
        return load_model(str(out), device=device, conditioning=cond, pipeline_options=load.get("pipeline_options"))
    teacher = load["teacher"]
    weights = out / "model.safetensors"
    if teacher.startswith("builtin:"):
        from schedules.adapters import load_state_dict
        from schedules.io import load_safetensors

        adapter = load_model(teacher, device=device, conditioning=cond)
        load_state_dict(adapter.module, load_safetensors(weights), str(weights))
        adapter.module.to(device)
        adapter.name = f"{teacher}@{out}"
        return adapter
    sched = out / "scheduler" if (out / "scheduler" / "scheduler_config.json").is_file() else None
    adapter = load_model(teacher, prediction=load["prediction"], shape=tuple(load["shape"]), scheduler_config=sched,
                         weights=weights, device=device, conditioning=cond)
    adapter.name = f"{teacher}@{out}"
    return adapter
