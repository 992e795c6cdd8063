"""Pipeline adapters: a diffusers pipeline + a Conditioning → a ConditionalAdapter.

The adapter is built from the pipeline's own components (text encoders via ``encode_prompt``,
latent shape from ``vae_scale_factor`` and height/width, SDXL added time ids, SD3 pooled
projections, Flux packed latents and guidance embedding, DiT class labels), so stepsmith's
sampler along a table evaluates exactly the network calls the pipeline makes with that table.

Supported: see :data:`PIPELINE_ADAPTERS`. Another pipeline takes one function::

    from schedules.pipeline_adapters import register_pipeline
    def build(pipe, conditioning, *, name, **options) -> ConditionalAdapter: ...
    register_pipeline("MyPipeline", build)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schedules.io import StepsmithError

# pipeline class name → "module:function" (imported on first use: each family pulls its own diffusers classes)
PIPELINE_ADAPTERS: dict[str, str | Callable[..., Any]] = {
    "StableDiffusionPipeline": "schedules.pipeline_adapters.sd:build",
    "StableDiffusionXLPipeline": "schedules.pipeline_adapters.sdxl:build",
    "StableDiffusion3Pipeline": "schedules.pipeline_adapters.sd3:build",
    "FluxPipeline": "schedules.pipeline_adapters.flux:build",
    "DiTPipeline": "schedules.pipeline_adapters.dit:build",
}

ADD_ONE = ("add one in Python: schedules.pipeline_adapters.register_pipeline(\"<PipelineClass>\", "
           "build) with build(pipe, conditioning, *, name, **options) returning a ConditionalAdapter")


def register_pipeline(class_name: str, build: Callable[..., Any]) -> None:
    """Make ``build(pipe, conditioning, *, name, **options)`` the adapter of ``class_name`` pipelines."""
    PIPELINE_ADAPTERS[class_name] = build


def builder_for(class_name: str) -> Callable[..., Any]:
    """The adapter builder of a pipeline class; a clear error naming the supported ones otherwise."""
    entry = PIPELINE_ADAPTERS.get(class_name)
    if entry is None:
        raise StepsmithError(f"{class_name} has no stepsmith adapter; supported pipelines: "
                             f"{', '.join(sorted(PIPELINE_ADAPTERS))} — {ADD_ONE}")
    if callable(entry):
        return entry
    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)


def adapter_from_pipeline(pipe, conditioning, *, name: str | None = None, **options):
    """The :class:`~schedules.conditioning.ConditionalAdapter` of ``pipe`` under ``conditioning``.

    The requested ``conditioning`` and the ``options`` (e.g. Flux's ``true_cfg_scale``, ``max_sequence_length``,
    DiT's ``null_class``) are kept on the adapter (``pipeline_conditioning``, ``pipeline_options``), so
    :func:`schedules.conditioning.with_guidance` rebuilds it from what was asked (an SDXL negative prompt left
    out, not the resolved "") with the same options."""
    cls = type(pipe).__name__
    adapter = builder_for(cls)(pipe, conditioning, name=name or cls, **options)
    if hasattr(adapter, "__dict__"):  # what it was built from, for a rebuild at another guidance (with_guidance)
        adapter.pipeline_conditioning = conditioning
        adapter.pipeline_options = {k: v for k, v in options.items() if v is not None}
    return adapter


def missing_text_components(folder: str | Path, index: dict[str, Any]) -> list[str]:
    """The text encoders / tokenizers a pipeline folder lacks: ``model_index.json`` says ``[null, null]`` (saved
    with ``text_encoder=None``) or names a sub-folder that is not there. Loading passes them as None, so the
    pipeline adapter refuses prompts with one clear message instead of a failed load."""
    folder = Path(folder)
    return sorted(k for k, v in index.items()
                  if k.startswith(("text_encoder", "tokenizer")) and isinstance(v, list) and len(v) == 2
                  and (v[0] is None or not (folder / k).is_dir()))


__all__ = ["PIPELINE_ADAPTERS", "adapter_from_pipeline", "builder_for", "missing_text_components", "register_pipeline"]
