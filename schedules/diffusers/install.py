"""Putting a table into a scheduler: ``set_timesteps`` arguments, direct installation, pinning.

A scheduler's record says how a table enters (``sigmas=``, ``timesteps=``, or neither).
Where the public arguments cannot carry the table (fractional timesteps, FlowMatchHeun,
EDMEuler's exponential schedule) it is *installed*: the solver state is reset with
``set_timesteps(K)`` and the table's sigmas/timesteps written over it. A *pinned* scheduler
installs its table whenever the pipeline calls ``set_timesteps``; it saves
(``save_pretrained``) as its diffusers base class, without the table.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from schedules.diffusers.choice import scheduler_for_table
from schedules.diffusers.detect import model_timesteps
from schedules.diffusers.records import base_class, record_for, supported_schedulers
from schedules.io import StepsmithError
from schedules.table import TimestepTable, as_table

logger = logging.getLogger("stepsmith.diffusers")

_EPS_T = 1e-3  # tolerance on model timesteps (1000-step scale) after float32 round trips
_RTOL_SIGMA = 1e-4


def native_kwargs(table: TimestepTable, scheduler) -> dict[str, Any] | None:
    """``set_timesteps`` keyword arguments that realise the table on ``scheduler`` exactly.

    ``None`` when the public arguments cannot express it (fractional timesteps on a
    ``timesteps=`` scheduler, FlowMatchHeun, ...); then the table is installed.
    The scheduler must already be the one :func:`scheduler_for_table` returned.
    """
    record = record_for(scheduler)
    for entry in record.entries if record is not None else ():
        kw = entry(table, scheduler)
        if kw is not None:
            return kw
    return None


def _heun_doubled(values: list[float]) -> list[float]:
    """Sigmas as Heun schedulers hold them: every interior node twice."""
    return [values[0]] + [s for s in values[1:-1] for _ in range(2)] + [values[-1]]


def install(scheduler, table: TimestepTable, device=None) -> None:
    """Set the scheduler's state to exactly the table, through set_timesteps where possible."""
    kw = native_kwargs(table, scheduler)
    if kw is not None:
        base_class(scheduler).set_timesteps(scheduler, device=device, **kw)
    else:
        install_direct(scheduler, table, device)
    verify_scheduler(table, scheduler)


def install_direct(scheduler, table: TimestepTable, device=None) -> None:
    """Reset all solver state with set_timesteps(K), then write the table's sigmas/timesteps.

    Each scheduler's ``step`` reads ``self.sigmas[step_index]``; timesteps only locate the
    step index and go to the network.
    """
    record, base = record_for(scheduler), base_class(scheduler)
    if record is None:
        raise StepsmithError(f"cannot install a table on {base.__name__}; supported: {supported_schedulers()}")
    K = table.steps
    params = inspect.signature(base.set_timesteps).parameters
    extra = {"mu": 0.0} if "mu" in params and scheduler.config.get("use_dynamic_shifting") else {}
    base.set_timesteps(scheduler, K, device=device, **extra)
    sigmas = _heun_doubled(table.sigmas) if record.heun_nodes else table.sigmas
    sig = torch.tensor(sigmas, dtype=torch.float32, device=device)
    if record.installed_timesteps is not None:
        scheduler.timesteps = record.installed_timesteps(scheduler, sig)
    else:
        scheduler.timesteps = torch.tensor(model_timesteps(table, scheduler), dtype=torch.float32, device=device)
    scheduler.sigmas = sig.to("cpu") if record.sigmas_on_cpu else sig
    scheduler.num_inference_steps = K


def verify_scheduler(table: TimestepTable, scheduler) -> None:
    """Raise unless the scheduler now holds exactly the table (sigmas and model timesteps)."""
    record = record_for(scheduler)
    got_t = [float(v) for v in scheduler.timesteps.tolist()]
    want_t = model_timesteps(table, scheduler)
    got_s = [float(v) for v in scheduler.sigmas.tolist()]
    want_s = _heun_doubled(table.sigmas) if record is not None and record.heun_nodes else list(table.sigmas)
    ok = len(got_t) == len(want_t) and len(got_s) == len(want_s)
    ok = ok and all(abs(a - b) <= _EPS_T * max(1.0, abs(b) / 1000) for a, b in zip(got_t, want_t))
    ok = ok and all(abs(a - b) <= _RTOL_SIGMA * max(abs(b), 1e-3) for a, b in zip(got_s, want_s))
    if not ok:
        raise StepsmithError(
            f"{base_class(scheduler).__name__} did not take the table exactly (timesteps {got_t[:4]}... vs "
            f"{want_t[:4]}..., sigmas {got_s[:4]}... vs {want_s[:4]}...); this diffusers version behaves "
            "differently — please report it"
        )


def apply_table(table: TimestepTable | str | Path | dict, scheduler, *, device=None, swap: bool = False):
    """Set ``scheduler`` to run exactly ``table``; returns the scheduler to drive.

    For hand-written loops: ``sch = apply_table(table, sch)`` then iterate over
    ``sch.timesteps`` calling ``sch.scale_model_input`` / ``sch.step`` as usual. With
    ``swap=False`` (default) a scheduler that cannot replay the table's solver raises; with
    ``swap=True`` the equivalent scheduler is returned instead (see :mod:`schedules.diffusers`).
    ``table`` may also be the path of a table JSON file or a table dict.
    """
    table = as_table(table)
    check_scheduler(scheduler)
    if table.olss is not None:  # OLSS: its own scheduler (the given one only supplies the noise schedule)
        from schedules.diffusers.olss_scheduler import OLSSScheduler

        sch = OLSSScheduler.from_table(table, scheduler)
        sch.set_timesteps(device=device)
        return sch
    sch, _ = scheduler_for_table(table, scheduler, swap=swap, what=type(scheduler).__name__)
    install(sch, table, device)
    return sch


def check_scheduler(scheduler, param: str = "scheduler") -> None:
    """Refuse what is not a diffusers scheduler (None, a pipeline, a class) with what to pass instead."""
    if hasattr(scheduler, "scheduler") and hasattr(scheduler, "components"):
        raise StepsmithError(f"`{param}` is a pipeline ({type(scheduler).__name__}); pass pipe.scheduler, "
                             "or use pipeline_kwargs(table, pipe) to run the table through the pipeline", param=param)
    if isinstance(scheduler, type):
        raise StepsmithError(f"`{param}` is the class {scheduler.__name__}; pass an instance "
                             f"({scheduler.__name__}.from_config(...) or pipe.scheduler)", param=param)
    if not (hasattr(scheduler, "set_timesteps") and hasattr(getattr(scheduler, "config", None), "keys")):
        raise StepsmithError(f"`{param}` must be a diffusers scheduler (e.g. pipe.scheduler), got "
                             f"{type(scheduler).__name__}", param=param)


# --------------------------------------------------------------------------- pinned schedulers

_PINNED: dict[type, type] = {}


def _pinned_set_timesteps(self, num_inference_steps=None, device=None, *args, timesteps=None, sigmas=None, **kwargs):
    if "_stepsmith_table" not in self.__dict__:  # called from the base __init__ (HeunDiscrete does)
        extra = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
        return self._stepsmith_base.set_timesteps(self, num_inference_steps, device, *args, **extra, **kwargs)
    table: TimestepTable = self._stepsmith_table
    K = table.steps
    if num_inference_steps is not None and int(num_inference_steps) not in (K, table.nfe):
        raise StepsmithError(
            f"a {K}-step stepsmith table is installed on this {self._stepsmith_base.__name__}; call the pipeline "
            f"with num_inference_steps={K} (or remove the table with schedules.diffusers.remove_table)"
        )
    for given in (timesteps, sigmas):
        if given is not None and len(given) != K:
            raise StepsmithError(f"a {K}-step table is installed on this scheduler; do not pass a "
                                 f"{len(given)}-value schedule as well")
        if given is not None:
            logger.warning("stepsmith: the installed table overrides the schedule the pipeline passed")
    install(self, table, device)


def _pinned_step(self, model_output, timestep, sample, *args, **kwargs):
    eta = kwargs.pop("eta", 0.0)
    if eta:
        raise StepsmithError(f"the stepsmith table replays a deterministic solver; call the pipeline with eta=0 (got {eta})")
    kwargs.pop("use_clipped_model_output", None)
    params = inspect.signature(self._stepsmith_base.step).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    return self._stepsmith_base.step(self, model_output, timestep, sample, *args, **kwargs)


def _pinned_class(base: type) -> type:
    if base not in _PINNED:
        _PINNED[base] = type(base.__name__, (base,), {
            "set_timesteps": _pinned_set_timesteps, "step": _pinned_step, "_stepsmith_base": base,
            "__module__": base.__module__, "__doc__": f"{base.__name__} pinned to a stepsmith table.",
        })
    return _PINNED[base]


def pin_table(table: TimestepTable, scheduler, *, swap: bool = True):
    """A copy of ``scheduler`` whose ``set_timesteps`` always installs ``table`` (ignores ``mu``).

    The copy is of the scheduler :func:`scheduler_for_table` picks (``swap`` as there).
    """
    table = as_table(table)
    check_scheduler(scheduler)
    scheduler, _ = scheduler_for_table(table, scheduler, swap=swap, what=base_class(scheduler).__name__)
    pinned = _pinned_class(base_class(scheduler)).from_config(scheduler.config)
    pinned._stepsmith_table = table
    install(pinned, table)
    return pinned
