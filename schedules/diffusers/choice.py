"""Choosing the scheduler that replays a table: the given one, a neutral copy, or a swap."""

from __future__ import annotations

import logging
from typing import Any

from schedules.conventions import Convention
from schedules.diffusers.detect import check_table, scheduler_convention
from schedules.diffusers.records import (
    STOCHASTIC,
    SchedulerRecord,
    base_class,
    record_for,
    supported_schedulers,
    swap_target,
)
from schedules.io import StepsmithError
from schedules.table import TimestepTable

logger = logging.getLogger("stepsmith.diffusers")


def fresh(cls: type, cfg: dict, overrides: dict[str, Any]) -> Any:
    """A new ``cls`` scheduler from ``cfg`` (the same noise schedule) with ``overrides`` applied."""
    base = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return cls.from_config({**base, **overrides})


def scheduler_for_table(table: TimestepTable, scheduler, *, swap: bool = True,
                        what: str = "this pipeline") -> tuple[Any, str | None]:
    """The scheduler that replays ``table`` exactly: ``scheduler`` itself, or a new one.

    Returns ``(scheduler, message)``; the message (also logged as a warning) says what was
    swapped or reconfigured and why. ``swap=False`` raises instead of swapping.
    """
    check_table(table, scheduler, what)
    conv, _ = scheduler_convention(scheduler)
    record = record_for(scheduler)
    if record is not None and isinstance(conv, record.convention) and table.solver in record.solvers:
        return _neutralised(table, scheduler, record, swap)
    return _swapped(table, scheduler, conv, record, swap)


def _neutralised(table: TimestepTable, scheduler, record: SchedulerRecord, swap: bool) -> tuple[Any, str | None]:
    """``scheduler`` if its config already does the table solver's arithmetic, else a neutral copy."""
    cfg = dict(scheduler.config)
    name = base_class(scheduler).__name__
    over = record.neutral(table)
    changed = {k: v for k, v in over.items() if k in cfg and cfg[k] != v}
    if not changed:
        return scheduler, None
    if not swap:
        raise StepsmithError(
            f"{name} is configured with {', '.join(f'{k}={cfg[k]!r}' for k in changed)}, which changes the "
            f"{table.solver} arithmetic the table was searched for; set {changed} or pass swap=True"
        )
    new = fresh(base_class(scheduler), cfg, over)
    shown = {k: v for k, v in changed.items() if k != "disable_corrector"}
    if "disable_corrector" in changed:
        shown["corrector"] = "off"
    msg = (f"stepsmith: running the {table.solver} table on a copy of {name} with "
           f"{', '.join(f'{k}={v!r}' for k, v in shown.items())} (the configured values would change the solver)")
    logger.warning(msg)
    return new, msg


def _swapped(table: TimestepTable, scheduler, conv: Convention, record: SchedulerRecord | None,
             swap: bool) -> tuple[Any, str]:
    """The equivalent scheduler of the table's solver, with the same noise schedule."""
    name = base_class(scheduler).__name__
    target = swap_target(conv, table.solver)  # EDM-preconditioned networks get an EDM scheduler (c_in, c_noise)
    if target is None:
        raise StepsmithError(f"no diffusers scheduler replays a {table.convention} {table.solver} table; "
                             f"supported: {supported_schedulers()}")
    reason = " (it samples stochastically)" if name in STOCHASTIC else \
        " (it takes no custom schedule)" if record is None else ""
    why = f"{name} cannot replay a {table.convention} {table.solver} table{reason}"
    if not swap:
        raise StepsmithError(f"{why}; use one of: {supported_schedulers()} — or pass swap=True")
    new = fresh(target.cls, dict(scheduler.config), target.neutral(table))
    msg = f"stepsmith: {why}; swapped in {target.name} (same noise schedule), which replays it exactly"
    logger.warning(msg)
    return new, msg
