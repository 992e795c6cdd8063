"""Pipeline plumbing: the keyword arguments that make ``pipe(...)`` run a table, and their checks."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import types
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schedules.adapters import local_model_path
from schedules.diffusers.choice import fresh, scheduler_for_table
from schedules.diffusers.detect import scheduler_convention
from schedules.diffusers.install import pin_table, verify_scheduler
from schedules.diffusers.records import base_class, record_for, swap_target
from schedules.io import StepsmithError
from schedules.table import TimestepTable, as_table

logger = logging.getLogger("stepsmith.diffusers")


# --------------------------------------------------------------------------- what a pipeline does


def _call_params(pipe) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


def _code_names(code: types.CodeType) -> set[str]:
    """Attribute/global names and identifier constants (``getattr(x, "name")``) a code object uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, str) and const.isidentifier():
            names.add(const)
        elif isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


@functools.cache
def _pipeline_code_names(cls: type) -> frozenset[str]:
    """Names the compiled methods of a pipeline class and its own bases use."""
    from diffusers import DiffusionPipeline

    shared = set(DiffusionPipeline.__mro__)  # the plumbing every pipeline inherits: not its sampling loop
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in shared:
            continue
        for attr in vars(klass).values():
            code = getattr(inspect.unwrap(getattr(attr, "__func__", attr)), "__code__", None)
            if isinstance(code, types.CodeType):
                names |= _code_names(code)
    return frozenset(names)


def pipeline_scales_input(pipe) -> bool:
    """Whether ``pipe`` applies ``init_noise_sigma`` and ``scale_model_input`` (Euler/Heun/EDM need both).

    Structural, not textual: reads the names the pipeline's compiled methods reference
    (attribute accesses and ``getattr``/``hasattr`` identifiers), so comments and docstrings do
    not count, and it works where no source file exists (classes defined in a notebook).
    SD/SDXL-style pipelines and stepsmith's own use both; DDPMPipeline and DDIMPipeline use
    neither (on diffusers 0.42 this agrees with reading the source for all its pipelines).
    """
    return {"scale_model_input", "init_noise_sigma"} <= _pipeline_code_names(type(pipe))


def _pipe_name(pipe) -> str:
    src = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    return f"{type(pipe).__name__}({src})" if src else type(pipe).__name__


# --------------------------------------------------------------------------- model identity


def check_model(table: TimestepTable, pipe) -> None:
    """Refuse a table recorded for another *local* model folder than the one ``pipe`` was loaded from.

    Only compares when both sides name a builtin model or an existing folder (flow models share
    one convention, so the name is the only identity a flow table carries).
    """
    mine = local_model_path(table.model)
    theirs = local_model_path(str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""))
    if mine is not None and theirs is not None and mine != theirs:
        raise StepsmithError(
            f"table was searched for {table.model} ({mine}) but the pipeline was loaded from {theirs}; "
            "search a table for this model, or pass allow_other_model=True if it is the same model copied elsewhere"
        )


# --------------------------------------------------------------------------- plans


def _unscaled(table: TimestepTable, pipe, sch):
    """``sch``, or an equivalent scheduler without input scaling if ``pipe`` never scales its input."""
    record = record_for(sch)
    if record is None or not record.scales_input or pipeline_scales_input(pipe):
        return sch
    conv, _ = scheduler_convention(sch)
    target = swap_target(conv, table.solver, unscaled=True)
    if target is None:
        raise StepsmithError(
            f"{type(pipe).__name__} never calls scheduler.scale_model_input / init_noise_sigma, which "
            f"{base_class(sch).__name__} needs to replay a {table.solver} table; use a euler/ddim/dpmpp-2m "
            "table (DPMSolverMultistep replays those without scaling) or a pipeline that scales its inputs"
        )
    logger.warning("stepsmith: %s never calls scheduler.scale_model_input, which %s needs; swapped in %s "
                   "(same noise schedule), which replays the table without it",
                   type(pipe).__name__, base_class(sch).__name__, target.name)
    return fresh(target.cls, dict(sch.config), target.neutral(table))


def _call_kwargs(table: TimestepTable, sch, params: set[str]) -> dict[str, Any] | None:
    """The first ``set_timesteps`` entry of ``sch``'s record that ``__call__`` takes, dry-run verified."""
    record = record_for(sch)
    for entry in record.entries if record is not None else ():
        kw = entry(table, sch)
        if kw is None or next(iter(kw)) not in params:
            continue
        probe = type(sch).from_config(sch.config)  # a throw-away copy: verified before any model call
        probe.set_timesteps(**kw)
        verify_scheduler(table, probe)
        return kw
    return None


def _plan(table: TimestepTable, pipe, original, swap: bool) -> tuple[Any, dict[str, Any]]:
    """(scheduler to put on the pipe, kwargs for the call) — all checks happen here."""
    what = _pipe_name(pipe)
    sch, _ = scheduler_for_table(table, original, swap=swap, what=what)
    sch = _unscaled(table, pipe, sch)
    params = _call_params(pipe)
    kw = _call_kwargs(table, sch, params)
    if kw is not None:
        if sch is not original:
            sch._stepsmith_original = original
        return sch, kw
    if "num_inference_steps" not in params:
        raise StepsmithError(f"{type(pipe).__name__}.__call__ takes neither timesteps=, sigmas= nor "
                             "num_inference_steps=; drive its scheduler with apply_table()")
    pinned = pin_table(table, sch)
    pinned._stepsmith_original = original
    logger.warning("stepsmith: %s takes no custom schedule for this table; installed it on pipe.scheduler "
                   "(%s) — call with num_inference_steps=%d", type(pipe).__name__, base_class(pinned).__name__, table.steps)
    return pinned, {"num_inference_steps": table.steps}


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _table_key(table: TimestepTable) -> str:
    d = table.to_dict()
    d.pop("provenance", None)
    return json.dumps(d, sort_keys=True, default=str)


# --------------------------------------------------------------------------- public


def _setting_mismatch(table: TimestepTable, settings: dict[str, Any]) -> list[str]:
    """The call's guidance / height / width / T5 length that differ from those the table was searched for."""
    block = table.conditioning or {}
    names = {"guidance_scale": "guidance", "height": "height", "width": "width",
             "max_sequence_length": "max_sequence_length"}
    return [f"{k} {v:g} (table: {block[names[k]]:g})" for k, v in settings.items()
            if v is not None and block.get(names[k]) is not None and float(v) != float(block[names[k]])]


def pipeline_kwargs(table: TimestepTable | str | Path | dict, pipe, *, swap: bool = True,
                    allow_other_model: bool = False, guidance_scale: float | None = None, height: int | None = None,
                    width: int | None = None, max_sequence_length: int | None = None) -> dict[str, Any]:
    """Keyword arguments that make ``pipe(..., **kwargs)`` run exactly ``table``.

    * Pipelines taking ``sigmas=``/``timesteps=`` (SD, SDXL, SD3, Flux, stepsmith's
      UnconditionalFlowMatchPipeline): returns ``{"sigmas": [...]}`` or ``{"timesteps": [...]}``
      for ``pipe.scheduler`` (shift compensated, N or N+1 values as the scheduler expects).
    * Otherwise (DDPMPipeline, DDIMPipeline, community pipelines), or when the table cannot
      pass through those arguments: installs a pinned scheduler on ``pipe`` and returns
      ``{"num_inference_steps": K}``.

    If ``pipe.scheduler`` cannot replay the table's solver, it is replaced by the
    equivalent scheduler with a logged warning (``swap=False`` raises instead). All checks
    (convention, prediction, ᾱ, solver, local model folder — see :func:`check_model`) run
    here, before any model call. The checked plan is cached per (table, scheduler config), so
    calling this before every generation costs well under a millisecond. ``table`` may also be
    the path of a table JSON file or a table dict.

    ``guidance_scale`` / ``height`` / ``width`` / ``max_sequence_length`` (SD3 / Flux), when given, are
    returned among the kwargs and compared with the setting the table was searched for (its
    ``conditioning`` block): a different one gets a ``UserWarning`` — the steps stay valid, but were not
    optimised for it (for SD3/Flux the resolution also changes the dynamic shift μ).
    """
    table = as_table(table)
    settings = {"guidance_scale": guidance_scale, "height": height, "width": width,
                "max_sequence_length": max_sequence_length}
    mismatch = _setting_mismatch(table, settings)
    if mismatch:
        warnings.warn(f"{table.method} table searched for another setting: {', '.join(mismatch)}; search one for "
                      "this setting for the best steps", stacklevel=2)
    extra = {k: v for k, v in settings.items() if v is not None}
    if not hasattr(pipe, "scheduler"):
        hint = " (for a scheduler use apply_table(table, scheduler))" if hasattr(pipe, "set_timesteps") else ""
        raise StepsmithError(f"`pipe` must be a diffusers pipeline, got {type(pipe).__name__}{hint}", param="pipe")
    if not allow_other_model:
        check_model(table, pipe)
    if table.olss is not None:  # OLSS replays through its own scheduler, whatever the pipeline's
        from schedules.diffusers.olss_scheduler import olss_pipeline_kwargs

        return {**olss_pipeline_kwargs(table, pipe), **extra}
    original = getattr(pipe.scheduler, "_stepsmith_original", pipe.scheduler)
    key = (_table_key(table), json.dumps(dict(original.config), sort_keys=True, default=str), type(pipe), swap)
    cache = _PLANS.setdefault(original, {})
    if key not in cache:
        cache.clear()  # one plan per scheduler is enough; tables change rarely
        cache[key] = _plan(table, pipe, original, swap)
    sch, kw = cache[key]
    if sch is not pipe.scheduler and sch is not original:
        pipe.scheduler = sch
    elif sch is original and pipe.scheduler is not original:
        pipe.scheduler = original
    return {**copy.deepcopy(kw), **extra}


def remove_table(pipe) -> None:
    """Put back the scheduler ``pipeline_kwargs`` replaced (no-op if none was)."""
    orig = getattr(pipe.scheduler, "_stepsmith_original", None)
    if orig is not None:
        pipe.scheduler = orig


@contextlib.contextmanager
def plugged(table: TimestepTable, pipe, **options) -> Iterator[dict[str, Any]]:
    """``with plugged(table, pipe) as kw: pipe(prompt, **kw)`` — restores the scheduler afterwards."""
    try:
        yield pipeline_kwargs(table, pipe, **options)
    finally:
        remove_table(pipe)
