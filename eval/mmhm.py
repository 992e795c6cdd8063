"""MMHM: one score per row from several quality metrics (a min–max-normalised harmonic mean).

Few-step samplers trade one metric for another (guidance can lower FID and hurt class
accuracy), so a single metric misleads. MMHM puts every metric on [0, 1] across the rows
being compared and takes their harmonic mean, which a single bad metric drags down:

* per metric, with bounds (min, max) over the rows: a lower-better metric (FID, KID, ...)
  gives u = (max − v) / (max − min), a higher-better one u = (v − min) / (max − min);
  equal bounds give u = 1 (the metric does not separate the rows);
* MMHM = m / Σ_m 1 / (ε + u_m) over the m metrics, ε = 1e-3; it lies in [≈ε, 1 + ε].

Scores are relative to the pool of rows: adding a row can change every score. To compare
runs, freeze the bounds (:meth:`Bounds.save`) and reuse them (:meth:`Bounds.load`);
values outside frozen bounds are clipped to u ∈ [0, 1]. A sweep compares rows of one NFE at
a time — of one (NFE, guidance) cell with a guidance list, since comparisons are only fair at
matched steps and guidance: :class:`GroupedBounds` holds one :class:`Bounds` per group (keys
``"4"``, or ``"4,w=3"`` grouped by ``"nfe,guidance"``), and :func:`load_bounds` reads every kind
of file (per-NFE files written before guidance grouping still apply, to every guidance of an NFE).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from schedules.io import StepsmithError, atomic_write_json

EPS = 1e-3
BOUNDS_FORMAT = "stepsmith.mmhm-bounds/v1"
GROUPED_FORMAT = "stepsmith.mmhm-grouped-bounds/v1"
Direction = Literal["lower", "higher"]

LOWER_BETTER = ("fid", "kid", "fid-teacher", "wasserstein", "mmd", "energy", "teacher", "teacher-mse", "teacher-rmse",
                "mse", "rmse", "straightness")
HIGHER_BETTER = ("precision", "recall", "density", "coverage", "is", "inception-score", "class-accuracy",
                 "accuracy", "clip", "clip-score", "pickscore", "teacher-psnr", "psnr")


def metric_direction(name: str) -> Direction:
    """``"lower"`` or ``"higher"``: which way ``name`` is better (case and ``_``/``-`` ignored)."""
    key = str(name).strip().lower().replace("_", "-")
    if key in LOWER_BETTER:
        return "lower"
    if key in HIGHER_BETTER:
        return "higher"
    raise StepsmithError(f"MMHM does not know whether {name!r} is better low or high; known metrics: lower-better "
                         f"{', '.join(LOWER_BETTER)}; higher-better {', '.join(HIGHER_BETTER)}")


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise StepsmithError(f"{what} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise StepsmithError(f"{what} is {v}; MMHM needs finite values (drop diverged rows first)")
    return float(v)


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not names:
        raise StepsmithError("MMHM needs at least one metric")
    if len(set(names)) != len(names):
        raise StepsmithError(f"MMHM metrics repeat a name: {list(names)}")
    for n in names:
        metric_direction(n)
    return names


def row_value(row: Mapping[str, Any], metric: str, i: int) -> float:
    """``row[metric]`` as a finite float, with an error naming the row."""
    if not isinstance(row, Mapping) or metric not in row:
        raise StepsmithError(f"row {i} has no value for metric {metric!r}; every row must have every MMHM metric")
    return _number(row[metric], f"row {i} {metric}")


@dataclass(frozen=True)
class Bounds:
    """Per-metric (min, max) used to normalise values; ``ranges[name] = (lo, hi)``."""

    ranges: dict[str, tuple[float, float]]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.ranges)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Bounds:
        """Min and max of each metric over ``rows`` (at least one row)."""
        names = _check_metrics(metrics)
        if not rows:
            raise StepsmithError("MMHM bounds need at least one row")
        ranges = {}
        for m in names:
            vals = [row_value(r, m, i) for i, r in enumerate(rows)]
            ranges[m] = (min(vals), max(vals))
        return cls(ranges)

    def normalise(self, metric: str, value: float) -> float:
        """u ∈ [0, 1] (1 = best of the pool); equal bounds give 1, values outside are clipped."""
        if metric not in self.ranges:
            raise StepsmithError(f"MMHM bounds have no range for {metric!r} (they cover {', '.join(self.metrics)})")
        lo, hi = self.ranges[metric]
        if hi == lo:
            return 1.0
        u = (hi - value) / (hi - lo) if metric_direction(metric) == "lower" else (value - lo) / (hi - lo)
        return min(1.0, max(0.0, u))

    def to_json(self) -> dict[str, Any]:
        return {"format": BOUNDS_FORMAT, "metrics": {
            m: {"direction": metric_direction(m), "min": lo, "max": hi} for m, (lo, hi) in self.ranges.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Write the bounds as JSON, atomically."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Any, source: str = "MMHM bounds") -> Bounds:
        """Validate a :meth:`to_json` object; every problem is a :class:`StepsmithError`."""
        if not isinstance(obj, dict) or obj.get("format") != BOUNDS_FORMAT:
            raise StepsmithError(f"{source} is not an MMHM bounds file (expected \"format\": \"{BOUNDS_FORMAT}\")")
        entries = obj.get("metrics")
        if not isinstance(entries, dict) or not entries:
            raise StepsmithError(f"{source}: \"metrics\" must be a non-empty object of name → {{min, max}}")
        ranges = {}
        for name, e in entries.items():
            if not isinstance(e, dict) or "min" not in e or "max" not in e:
                raise StepsmithError(f"{source}: metric {name!r} must be an object with \"min\" and \"max\"")
            lo, hi = _number(e["min"], f"{source} {name}.min"), _number(e["max"], f"{source} {name}.max")
            if lo > hi:
                raise StepsmithError(f"{source}: metric {name!r} has min {lo} > max {hi}")
            direction = metric_direction(name)
            if e.get("direction", direction) != direction:
                raise StepsmithError(f"{source}: metric {name!r} is {direction}-better, the file says {e['direction']!r}")
            ranges[name] = (lo, hi)
        return cls(ranges)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bounds:
        """Read bounds written by :meth:`save`, with clear errors for a bad file."""
        return cls.from_json(_read_json(path), f"MMHM bounds file {path}")


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise StepsmithError(f"MMHM bounds file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StepsmithError(f"cannot read MMHM bounds file {path}: {exc}") from None


BY_NFE, BY_NFE_GUIDANCE = "nfe", "nfe,guidance"


def _scale(w: float) -> str:
    s = f"{float(w):g}"
    return s if float(s) == float(w) else repr(float(w))


def group_key(nfe: int, guidance: float | None = None) -> str:
    """The key of a group of rows: ``"4"`` (one NFE), ``"4,w=3"`` (NFE 4 at guidance 3)."""
    return str(int(nfe)) if guidance is None else f"{int(nfe)},w={_scale(guidance)}"


@dataclass(frozen=True)
class GroupedBounds:
    """One :class:`Bounds` per group of rows compared together: a sweep's NFE (``group_by`` ``"nfe"``, keys
    ``"4"``, ``"6"``...) or, with a guidance list, its (NFE, guidance) cell (``"nfe,guidance"``, keys from
    :func:`group_key`: ``"4,w=1"``, ``"4,w=3"``...)."""

    groups: dict[str, Bounds]
    group_by: str = BY_NFE

    def get(self, key: Any) -> Bounds:
        """The bounds of group ``key``; a clear error when the file has none for it."""
        if str(key) in self.groups:
            return self.groups[str(key)]
        if self.group_by == BY_NFE_GUIDANCE:
            raise StepsmithError(f"MMHM bounds have no (NFE, guidance) group {key} (they cover "
                                 f"{'; '.join(self.groups)}); save bounds from a run with that NFE and guidance",
                                 param="bounds")
        raise StepsmithError(f"MMHM bounds have no {self.group_by} {key} group (they cover {self.group_by} "
                             f"{', '.join(self.groups)}); save bounds from a run with that {self.group_by}",
                             param="bounds")

    def lookup(self, nfe: int, guidance: float | None = None) -> Bounds:
        """The bounds of the rows at ``nfe`` (and ``guidance``): per-NFE bounds serve every guidance of an NFE;
        per-(NFE, guidance) bounds need the guidance of the rows."""
        if self.group_by != BY_NFE_GUIDANCE:
            return self.get(group_key(nfe))
        if guidance is None:
            raise StepsmithError(f"the MMHM bounds are per (NFE, guidance) cell (they cover {', '.join(self.groups)}); "
                                 "this run has no guidance list — pass the guidance scales (--guidance), or bounds "
                                 "saved from a run without one", param="bounds")
        return self.get(group_key(nfe, guidance))

    def to_json(self) -> dict[str, Any]:
        return {"format": GROUPED_FORMAT, "group_by": self.group_by,
                "groups": {k: b.to_json()["metrics"] for k, b in self.groups.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Write the bounds as JSON, atomically."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Any, source: str = "MMHM bounds") -> GroupedBounds:
        """Validate a :meth:`to_json` object; every problem is a :class:`StepsmithError`."""
        groups = obj.get("groups") if isinstance(obj, dict) else None
        if not isinstance(groups, dict) or not groups or not isinstance(obj.get("group_by"), str):
            raise StepsmithError(f"{source}: a grouped bounds file needs \"group_by\" and a non-empty \"groups\"")
        if obj["group_by"] not in (BY_NFE, BY_NFE_GUIDANCE):
            raise StepsmithError(f"{source}: \"group_by\" must be {BY_NFE!r} or {BY_NFE_GUIDANCE!r}, got "
                                 f"{obj['group_by']!r}")
        return cls({str(k): Bounds.from_json({"format": BOUNDS_FORMAT, "metrics": v}, f"{source} group {k}")
                    for k, v in groups.items()}, obj["group_by"])


def load_bounds(path: str | os.PathLike) -> Bounds | GroupedBounds:
    """A bounds file of either kind: one pool (:class:`Bounds`) or one pool per group."""
    obj = _read_json(path)
    if isinstance(obj, dict) and obj.get("format") == GROUPED_FORMAT:
        return GroupedBounds.from_json(obj, f"MMHM bounds file {path}")
    return Bounds.from_json(obj, f"MMHM bounds file {path}")


class MMHMScores(list):
    """The MMHM of each row (a list of floats) plus what went into it: ``metrics``,
    ``bounds`` and ``eps``."""

    def __init__(self, scores: Sequence[float], metrics: tuple[str, ...], bounds: Bounds, eps: float):
        super().__init__(scores)
        self.metrics, self.bounds, self.eps = metrics, bounds, eps

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": list(self.metrics), "eps": self.eps, "bounds": self.bounds.to_json()["metrics"],
                "scores": list(self)}


def harmonic(us: Sequence[float], eps: float = EPS) -> float:
    """m / Σ 1 / (ε + u) of normalised values ``us``."""
    return len(us) / sum(1.0 / (eps + u) for u in us)


def mmhm(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], bounds: Bounds | None = None,
         eps: float = EPS) -> MMHMScores:
    """MMHM of each row over ``metrics`` (every row must have every metric).

    ``bounds=None`` takes min/max over ``rows`` (scores relative to this pool); pass frozen
    :class:`Bounds` to compare runs — values outside them are clipped to u ∈ [0, 1].
    Returns a list of floats, one per row, that also records ``metrics``, ``bounds``, ``eps``.
    """
    names = _check_metrics(metrics)
    if not eps > 0:
        raise StepsmithError(f"MMHM eps must be positive, got {eps}")
    b = Bounds.from_rows(rows, names) if bounds is None else bounds
    missing = [m for m in names if m not in b.ranges]
    if missing:
        raise StepsmithError(f"MMHM bounds have no range for {', '.join(missing)} (they cover {', '.join(b.metrics)}); "
                             "recompute the bounds with these metrics")
    used = Bounds({m: b.ranges[m] for m in names})
    scores = [harmonic([used.normalise(m, row_value(r, m, i)) for m in names], eps) for i, r in enumerate(rows)]
    return MMHMScores(scores, names, used, eps)
