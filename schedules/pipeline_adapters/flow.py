"""What the rectified-flow pipeline adapters (SD3, Flux) share: the FlowMatch scheduler's convention,
the resolution-dependent shift μ and the T5 sequence length.

Both pipelines run a ``FlowMatchEulerDiscreteScheduler``: x_σ = (1-σ)·x0 + σ·ε with a velocity
prediction ε − x0 (stepsmith's ``flow``). With ``use_dynamic_shifting`` the pipeline's default
schedule is shifted by μ = calculate_shift(image sequence length), a line from ``base_shift`` at
``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len`` tokens (Esser et al. 2024,
"Scaling Rectified Flow Transformers", resolution-dependent shifting).
"""

from __future__ import annotations

import inspect
from typing import Any

from schedules.io import StepsmithError


def flow_convention(pipe, name: str, family: str):
    """(convention, prediction, scheduler config with its ``_class_name``) of the pipeline's FlowMatch scheduler."""
    from schedules.diffusers.detect import scheduler_convention
    from schedules.diffusers.records import base_class

    sch = pipe.scheduler
    cfg = dict(sch.config, _class_name=base_class(sch).__name__)
    conv, pred = scheduler_convention(sch)
    if conv.name != "flow":
        raise StepsmithError(f"{name}: its scheduler {cfg['_class_name']} is not a FlowMatch scheduler; {family} is a "
                             "rectified-flow model — load it with its FlowMatchEulerDiscreteScheduler")
    return conv, pred, cfg


def dynamic_mu(cfg: dict[str, Any], image_seq_len: int) -> dict[str, Any]:
    """μ of the pipeline's resolution-dependent shift (its ``calculate_shift``, with the pipeline's defaults)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    return {"mu": round(float(mu), 6), "image_seq_len": int(image_seq_len)}


def call_default(pipe, param: str, fallback: Any) -> Any:
    """The default of ``pipe.__call__``'s ``param`` (what the pipeline uses when it is not passed)."""
    try:
        p = inspect.signature(type(pipe).__call__).parameters.get(param)
    except (TypeError, ValueError):
        p = None
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def sequence_length(pipe, value: Any, name: str, fallback: int) -> int:
    """``max_sequence_length`` (T5 tokens): the option, else the pipeline's own default."""
    v = call_default(pipe, "max_sequence_length", fallback) if value is None else value
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise StepsmithError(f"`max_sequence_length` of {name} must be a positive integer, got {v!r}",
                             param="max_sequence_length")
    return int(v)


__all__ = ["call_default", "dynamic_mu", "flow_convention", "sequence_length"]
