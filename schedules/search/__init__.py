"""Schedule search: one entry point for every method and baseline.

``make_table(adapter, method, nfe, solver="euler", *, samples=None, seed=0, progress=False, **options)``
returns a validated :class:`~schedules.table.TimestepTable`. Searched tables carry provenance:
seed, samples, grid, model calls, seconds, solver and package version. Search samples are drawn
from noise seed ``seed``; evaluate on other seeds (``eval`` defaults to 10 000).

Methods: ``dp`` (:mod:`schedules.search.dp`), ``evolution`` (:mod:`schedules.search.evolution`),
``ays`` (:mod:`schedules.search.ays`), and every baseline of :mod:`schedules.baselines`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from schedules.baselines import BASELINES, baseline
from schedules.io import StepsmithError
from schedules.solvers import get_solver
from schedules.table import TimestepTable

SEARCHED: dict[str, str] = {
    "dp": "schedules.search.dp_method:dp_table",
    "evolution": "schedules.search.evolution:evolution_table",
    "ays": "schedules.search.ays:ays_table",
}
METHODS: tuple[str, ...] = tuple(SEARCHED) + tuple(BASELINES)
DEFAULT_SAMPLES = 64


def _resolve(target: str) -> Callable[..., TimestepTable]:
    import importlib

    mod, attr = target.split(":")
    return getattr(importlib.import_module(mod), attr)


def make_table(adapter, method: str, nfe: int, solver: str = "euler", *, samples: int | None = None, seed: int = 0,
               progress: bool = False, **options) -> TimestepTable:
    """Build the timestep table of ``method`` for ``nfe`` model evaluations with ``solver``."""
    get_solver(solver)
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise StepsmithError(f"NFE must be a positive integer, got {nfe!r}")
    if method in BASELINES:
        return baseline(adapter, method, nfe, solver, **options)
    if method not in SEARCHED:
        raise StepsmithError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    B = DEFAULT_SAMPLES if samples is None else int(samples)
    if B < 1:
        raise StepsmithError(f"samples must be at least 1, got {B}")
    fn = _resolve(SEARCHED[method])
    calls0 = getattr(adapter, "calls", 0)
    t0 = time.perf_counter()
    try:
        table = fn(adapter, nfe, solver, samples=B, seed=int(seed), progress=progress, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise StepsmithError(f"method {method!r} does not take these options ({exc})") from None
        raise
    prov = table.provenance
    prov.setdefault("seed", int(seed))
    prov.setdefault("samples", B)
    prov.setdefault("solver", solver)
    prov.setdefault("model_calls", getattr(adapter, "calls", 0) - calls0)
    prov.setdefault("seconds", round(time.perf_counter() - t0, 3))
    table.validate()
    return table


__all__ = ["METHODS", "make_table", "SEARCHED", "DEFAULT_SAMPLES"]
