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
    """The :class:`~schedules.conditioning.ConditionalAdapter` of ``pipe`` under ``conditioning``."""
    cls = type(pipe).__name__
    return builder_for(cls)(pipe, conditioning, name=name or cls, **options)


__all__ = ["PIPELINE_ADAPTERS", "adapter_from_pipeline", "builder_for", "register_pipeline"]
