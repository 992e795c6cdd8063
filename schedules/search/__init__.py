"""Schedule search: one entry point for every method and baseline.

``make_table(adapter, method, nfe, solver="euler", *, samples=None, seed=0, progress=False, **options)``
returns a validated :class:`~schedules.table.TimestepTable`. Searched tables carry provenance:
seed, samples, grid, model calls, seconds, solver and package version. Search samples are drawn
from noise seed ``seed``; evaluate on other seeds (``eval`` defaults to 10 000).

Methods: ``dp`` (:mod:`schedules.search.dp`), ``evolution`` (:mod:`schedules.search.evolution`),
``ays`` (:mod:`schedules.search.ays`), ``olss`` (:mod:`schedules.search.olss`), every baseline of :mod:`schedules.baselines`, and any
function added with :func:`register`. ``options`` are checked against the method's signature
before it runs, so a misspelt option is refused with the list of valid ones, while a
``TypeError`` raised inside a method propagates as the bug it is.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

from schedules.baselines import BASELINES
from schedules.io import StepsmithError
from schedules.search.ays import ays_table, ays_tables
from schedules.search.dp_method import dp_table, dp_tables
from schedules.search.evolution import evolution_table
from schedules.search.interp import interp_table
from schedules.search.olss import olss_table
from schedules.solvers import get_solver
from schedules.table import TimestepTable

SearchMethod = Callable[..., TimestepTable]
"""``fn(adapter, nfe, solver, *, samples, seed, progress, **options) -> TimestepTable``."""

SEARCHED: dict[str, SearchMethod] = {"dp": dp_table, "evolution": evolution_table, "ays": ays_table,
                                     "interp": interp_table, "olss": olss_table}
def _ays_tables(adapter, nfes: list[int], solver: str = "euler", **options) -> dict[int, TimestepTable]:
    return dict(zip(nfes, ays_tables(adapter, nfes, solver, **options)))


MULTI_BUDGET = {"dp": dp_tables, "ays": _ays_tables}  # methods that answer several budgets from one pass
DEFAULT_SAMPLES = 64
SEARCH_KEYWORDS = ("samples", "seed", "progress")  # passed by make_table itself, never as options


def register(name: str, fn: SearchMethod) -> None:
    """Make ``fn`` available as ``make_table(adapter, name, ...)`` and ``stepsmith search --method name``."""
    if name in BASELINES:
        raise StepsmithError(f"{name!r} is a baseline; register the search method under another name", param="name")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in SEARCH_KEYWORDS if k not in params and not takes_any]
    if missing:
        raise StepsmithError(f"search method {name!r} must take the keywords {_names(missing)}", param="fn")
    SEARCHED[name] = fn


def methods() -> tuple[str, ...]:
    """Every name ``make_table`` accepts: searched methods first, then the baselines."""
    return tuple(SEARCHED) + tuple(BASELINES)


def __getattr__(name: str):
    """``METHODS`` is computed on access, so it includes methods added with :func:`register`."""
    if name == "METHODS":
        return methods()
    raise AttributeError(f"module 'schedules.search' has no attribute {name!r}")


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


def method_options(method: str) -> tuple[str, ...] | None:
    """The ``**options`` ``method`` takes (None: any, it has ``**kwargs``), read from its signature.

    The first three parameters are (adapter, nfe, solver); a searched method's ``samples``, ``seed``
    and ``progress`` are make_table's own arguments, not options.
    """
    if method in BASELINES:
        fn, own = BASELINES[method], ()
    elif method in SEARCHED:
        fn, own = SEARCHED[method], SEARCH_KEYWORDS
    else:
        raise StepsmithError(f"unknown method {method!r}; choose one of {', '.join(methods())}", param="method")
    params = list(inspect.signature(fn).parameters.values())[3:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in named and p.name not in own)


def check_request(method: str, nfe: int, solver: str = "euler", *, samples: int | None = None,
                  options: dict | None = None, exact_nfe: bool = False) -> None:
    """Refuse a bad request before any model call (the search CLI runs this before loading the model).

    With ``exact_nfe`` (the command line) an NFE the solver cannot spend exactly (Heun: even) is
    refused instead of rounded down.
    """
    valid = method_options(method)
    spec = get_solver(solver)
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise StepsmithError(f"`nfe` must be a positive integer, got {nfe!r}", param="nfe")
    if exact_nfe and spec.nfe(spec.steps_for_nfe(nfe)) != nfe:
        K = spec.steps_for_nfe(nfe)
        raise StepsmithError(f"{solver} uses 2K-1 evaluations: `nfe` {nfe} gives {K} step(s) (NFE {spec.nfe(K)}); "
                             "pass an odd NFE (1, 3, 5, ...)", param="nfe")
    if samples is not None and int(samples) < 1:
        raise StepsmithError(f"`samples` must be at least 1, got {samples}", param="samples")
    options = options or {}
    unknown = [k for k in options if valid is not None and k not in valid]
    if unknown:
        kind = "baseline" if method in BASELINES else "method"
        raise StepsmithError(f"{kind} {method!r} does not take {_names(unknown)}; its options are "
                             f"{_names(valid) or 'none'}", param=unknown[0])
    if options.get("grid") is not None and options["grid"] < 2:
        raise StepsmithError(f"`grid` must be at least 2 intervals, got {options['grid']}", param="grid")


def make_table(adapter, method: str, nfe: int, solver: str = "euler", *, samples: int | None = None, seed: int = 0,
               progress: bool = False, **options) -> TimestepTable:
    """Build the timestep table of ``method`` for ``nfe`` model evaluations with ``solver``.

    Baselines ignore ``samples``, ``seed`` and ``progress`` (they are pure functions of the model's
    convention); searched methods get ``samples`` (default 64) from noise seed ``seed``.
    """
    if method in BASELINES:
        check_request(method, nfe, solver, options=options)
        return BASELINES[method](adapter, nfe, solver, **options)
    B = DEFAULT_SAMPLES if samples is None else int(samples)
    check_request(method, nfe, solver, samples=B, options=options)
    calls0 = getattr(adapter, "calls", 0)
    t0 = time.perf_counter()
    table = SEARCHED[method](adapter, nfe, solver, samples=B, seed=int(seed), progress=progress, **options)
    return _finish_searched(table, adapter, seed=int(seed), samples=B, solver=solver, t0=t0,
                            model_calls=getattr(adapter, "calls", 0) - calls0)


CARRY_SOURCE_CONDITIONING = ("interp",)  # methods whose steps come from a source table, valid for what it is valid for


def _finish_searched(table: TimestepTable, adapter, *, seed: int, samples: int, solver: str, t0: float,
                     model_calls: int | None = None) -> TimestepTable:
    """What every searched table records: seed, samples, solver, seconds, its final jump, and the
    conditioning it is valid for (guidance and conditions it was searched under); then validate it."""
    prov = table.provenance
    prov.setdefault("seed", seed)
    prov.setdefault("samples", samples)
    prov.setdefault("solver", solver)
    if model_calls is not None:  # multi-budget searches record each table's own calls themselves
        prov.setdefault("model_calls", model_calls)
    prov.setdefault("seconds", round(time.perf_counter() - t0, 3))
    prov.setdefault("final_jump", table.final_jump())
    cond = getattr(adapter, "conditioning", None)
    if cond is not None and table.method not in CARRY_SOURCE_CONDITIONING:
        table.conditioning = cond.describe()
    table.validate()
    return table


def make_tables(adapter, method: str, nfe: list[int], solver: str = "euler", *, samples: int | None = None,
                seed: int = 0, progress: bool = False, **options) -> dict[int, TimestepTable]:
    """One table per budget of ``nfe``: ``dp`` from one shared pass (:func:`~schedules.search.dp_method.dp_tables`),
    every other method by one search per budget."""
    budgets = list(dict.fromkeys(nfe))
    if not budgets:
        raise StepsmithError("`nfe` needs at least one budget", param="nfe")
    if method not in MULTI_BUDGET or len(budgets) == 1:
        return {k: make_table(adapter, method, k, solver, samples=samples, seed=seed, progress=progress, **options)
                for k in budgets}
    B = DEFAULT_SAMPLES if samples is None else int(samples)
    for k in budgets:
        check_request(method, k, solver, samples=B, options=options)
    t0 = time.perf_counter()
    tables = MULTI_BUDGET[method](adapter, budgets, solver, samples=B, seed=int(seed), progress=progress, **options)
    return {k: _finish_searched(t, adapter, seed=int(seed), samples=B, solver=solver, t0=t0) for k, t in tables.items()}


__all__ = ["DEFAULT_SAMPLES", "METHODS", "SEARCHED", "SearchMethod", "check_request", "make_table", "make_tables",
           "method_options", "methods", "register"]
