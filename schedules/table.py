"""The timestep table: the product's currency.

A table is what a search produces and what a pipeline consumes. JSON layout
(``"format": "stepsmith.schedule/v1"``)::

    {
      "format": "stepsmith.schedule/v1",
      "sigmas": [...],        # K+1 native sigmas, strictly decreasing, last is exactly 0
      "timesteps": [...],     # K model-time values the network receives (one per evaluated node)
      "steps": K,
      "nfe": N,               # model evaluations with this solver (Heun: 2K-1)
      "solver": "euler",
      "prediction": "flow",   # flow | epsilon | v | x0
      "convention": "flow",   # flow | vp  (see schedules.conventions)
      "convention_config": {...},  # flow: time_scale; vp: T and a hash of ᾱ
      "method": "dp",
      "model": "builtin:digits-flow",
      "objective": 0.0123,    # the search objective reached, or null
      "provenance": {...},    # seed, samples, grid, seconds, model calls, version
      "conditioning": {...},  # optional (conditional models): guidance, classes / prompt fingerprint, negative
      "olss": {...}           # solver "olss" only: {"version": 1, "prediction", "guidance", "coefficients"}
    }

A table without ``conditioning`` (every unconditional table) is the same v1 file as before.
An ``olss`` table (:mod:`schedules.search.olss`) carries its fitted coefficients: row k holds the
k+2 weights of x_T and of the model outputs at nodes 0..k that give the state at node k+1.

Validation runs on construction and on load; each error names the field and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from schedules.conventions import PREDICTIONS, Convention
from schedules.io import StepsmithError, atomic_write_json
from schedules.solvers import SOLVERS, TABLE_SOLVERS, get_solver

FORMAT = "stepsmith.schedule/v1"
CONVENTIONS = ("flow", "vp")
_VP_TIMESTEP_TOL = 1e-3  # model timesteps (1000-step scale) after float round trips

# JSON type of every field (``None`` allowed where the field is optional); checked on load so a
# string "4" is reported as a string, not as a wrong count
_FIELD_TYPES: dict[str, tuple[str, tuple[type, ...], bool]] = {
    "format": ("a string", (str,), False), "solver": ("a string", (str,), False),
    "prediction": ("a string", (str,), False), "convention": ("a string", (str,), False),
    "method": ("a string", (str,), False), "model": ("a string", (str,), False),
    "sigmas": ("a list of numbers", (list,), False), "timesteps": ("a list of numbers", (list,), False),
    "steps": ("an integer", (int,), True), "nfe": ("an integer", (int,), True),
    "objective": ("a number", (int, float), True), "convention_config": ("an object", (dict,), False),
    "provenance": ("an object", (dict,), False), "conditioning": ("an object", (dict,), True),
    "olss": ("an object", (dict,), True),
}

# VP noise schedules (by ᾱ hash) seen in this process: a table for one of them has its
# timesteps checked against its sigmas on every validation
_KNOWN_VP: dict[str, Convention] = {}


def _remember(convention: Convention) -> None:
    sha = convention.config().get("alphas_cumprod_sha256")
    if sha is not None:
        _KNOWN_VP[sha] = convention


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_field_types(d: dict[str, Any]) -> None:
    """Refuse a table dict whose fields have the wrong JSON type, naming the field and the value."""
    for name, (what, types, optional) in _FIELD_TYPES.items():
        if name not in d or (optional and d[name] is None):
            continue
        v = d[name]
        ok = isinstance(v, types) and not isinstance(v, bool)
        if ok and types == (list,):
            bad = [x for x in v if not isinstance(x, (int, float)) or isinstance(x, bool)]
            if bad:
                raise StepsmithError(f"invalid timestep table: `{name}` must be a list of numbers, "
                                     f"got {_describe(bad[0])} at index {v.index(bad[0])}", param=name)
        if not ok:
            raise StepsmithError(f"invalid timestep table: `{name}` must be {what}, got {_describe(v)}", param=name)


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("stepsmith")
    except Exception:
        return "0+unknown"


@dataclass
class TimestepTable:
    sigmas: list[float]
    timesteps: list[float]
    solver: str
    prediction: str
    convention: str
    method: str
    model: str
    convention_config: dict[str, Any] = field(default_factory=dict)
    objective: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    nfe: int | None = None
    format: str = FORMAT
    conditioning: dict[str, Any] | None = None  # what a conditional model's table is valid for (guidance, classes)
    olss: dict[str, Any] | None = None  # solver "olss": version, prediction, guidance, coefficients (see check_olss)

    def __post_init__(self) -> None:
        self.sigmas = _floats(self.sigmas, "sigmas")
        self.timesteps = _floats(self.timesteps, "timesteps")
        K = len(self.sigmas) - 1
        if self.steps is None:
            self.steps = K
        if (self.solver in SOLVERS or self.solver in TABLE_SOLVERS) and self.nfe is None and K >= 1:
            self.nfe = get_solver(self.solver).nfe(K)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(field_name: str, why: str, fix: str) -> StepsmithError:
            return StepsmithError(f"invalid timestep table: {field_name}: {why} — {fix}")

        if self.format != FORMAT:
            raise bad("format", f"{self.format!r} is not {FORMAT!r}", "this file is not a stepsmith v1 table")
        s = self.sigmas
        if len(s) < 2:
            raise bad("sigmas", "needs at least 2 values (start and the terminal 0)", "add the terminal 0")
        if any(not math.isfinite(v) for v in s + self.timesteps):
            raise bad("sigmas/timesteps", "contain NaN or Inf", "regenerate the table")
        if s[-1] != 0.0:
            raise bad("sigmas", f"must end in exactly 0 (the terminal value), got {s[-1]:g}", "append 0.0")
        for i in range(len(s) - 1):
            if not s[i] > s[i + 1]:
                raise bad("sigmas", f"not strictly decreasing at index {i} ({s[i]:g} then {s[i + 1]:g})",
                          "sort from noise to data and remove duplicate steps")
        K = len(s) - 1
        if self.steps != K:
            raise bad("steps", f"is {self.steps} but sigmas hold {K} steps ({K + 1} values)",
                      "set steps = len(sigmas) - 1")
        if len(self.timesteps) != K:
            raise bad("timesteps", f"has {len(self.timesteps)} values but there are {K} steps",
                      "give one timestep per evaluated node (the terminal 0 has none)")
        t = self.timesteps
        if len(set(t)) != len(t):
            raise bad("timesteps", "contain duplicates", "use distinct steps (duplicates break diffusers schedulers)")
        if not (all(t[i] > t[i + 1] for i in range(K - 1))):
            raise bad("timesteps", "must be strictly decreasing (noise to data)", "sort them in descending order")
        if self.solver not in SOLVERS and self.solver not in TABLE_SOLVERS:
            raise bad("solver", f"unknown solver {self.solver!r}", f"use one of {', '.join(SOLVERS)}")
        expect = get_solver(self.solver).nfe(K)
        if self.nfe != expect:
            raise bad("nfe", f"is {self.nfe} but {self.solver} with {K} steps makes {expect} evaluations",
                      f"set nfe = {expect}")
        if self.convention not in CONVENTIONS:
            raise bad("convention", f"unknown convention {self.convention!r}", "use 'flow' or 'vp'")
        if self.prediction not in PREDICTIONS[self.convention]:
            raise bad("prediction", f"{self.prediction!r} does not fit convention {self.convention!r}",
                      f"use one of {PREDICTIONS[self.convention]}")
        if self.convention == "flow" and s[0] > 1 + 1e-9:
            raise bad("sigmas", f"flow sigmas lie in [0, 1] but the first is {s[0]:g}",
                      "this looks like a VP/EDM table: set convention to 'vp'")
        if self.objective is not None and not isinstance(self.objective, (int, float)):
            raise bad("objective", "must be a number or null", "store the objective value as a float")
        check_olss(self.olss, self.solver, K, self.prediction)
        known = _KNOWN_VP.get(self.convention_config.get("alphas_cumprod_sha256")) if self.convention == "vp" else None
        if known is not None:
            self.check_timesteps(known)

    def check_timesteps(self, convention: Convention) -> None:
        """Refuse VP timesteps that are not the convention's mapping of the sigmas.

        The CLI samples the sigmas while diffusers feeds the network the timesteps: a table where
        they disagree would run two different schedules.
        """
        if convention.name != "vp" or convention.config().get("alphas_cumprod_sha256") is None:
            return  # flow tables derive timesteps from sigmas; EDM models receive c_noise(σ)
        try:
            want = convention.model_time(torch.tensor(self.sigmas[:-1], dtype=torch.float64)).tolist()
        except StepsmithError:
            return  # σ outside the model's range: check_sigmas and the samplers report it
        for i, (got, exp) in enumerate(zip(self.timesteps, want)):
            if abs(got - exp) > _VP_TIMESTEP_TOL:
                raise StepsmithError(
                    f"invalid timestep table: timesteps: timestep {got:g} at index {i} disagrees with sigma "
                    f"{self.sigmas[i]:g}, which the noise schedule maps to timestep {exp:.6g} — rebuild the "
                    "table from its sigmas (TimestepTable.from_sigmas) or fix the timesteps", param="timesteps")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_sigmas(cls, sigmas: Sequence[float] | torch.Tensor, *, convention: Convention, prediction: str,
                    solver: str, method: str, model: str, objective: float | None = None,
                    provenance: dict[str, Any] | None = None) -> TimestepTable:
        """Build a table from native sigmas (terminal 0 included); timesteps are derived."""
        _remember(convention)
        s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
        if len(s) >= 2 and s[-1] == 0.0 and all(math.isfinite(v) and v > 0 for v in s[:-1]):
            ts = convention.model_time(torch.tensor(s[:-1], dtype=torch.float64)).tolist()
            # discrete VP timesteps come back through a log-interpolation; snap float noise
            ts = [float(round(t)) if abs(t - round(t)) < 1e-6 else t for t in ts]
        else:
            ts = []  # let validation explain what is wrong with sigmas
        prov = {"package_version": package_version()}
        prov.update(provenance or {})
        return cls(sigmas=s, timesteps=ts, solver=solver, prediction=prediction, convention=convention.name,
                   convention_config=convention.config(), method=method, model=model,
                   objective=None if objective is None else float(objective), provenance=prov)

    # ------------------------------------------------------------------ interchange
    def to_sigmas(self) -> torch.Tensor:
        """k-diffusion style float tensor of the K+1 sigmas, ending in 0."""
        return torch.tensor(self.sigmas, dtype=torch.float32)

    def final_jump(self) -> dict[str, Any]:
        """The last evaluated node and the jump from it to σ = 0.

        ``fraction`` is the share of the noise range (in model time, t_last / t_first) that the final
        step crosses in one evaluation: a long last jump lands on the posterior mean, which a
        coupled-MSE objective favours and which shows as blur on sharp data.
        """
        t_first, t_last = self.timesteps[0], self.timesteps[-1]
        return {"sigma_last": float(f"{self.sigmas[-2]:.6g}"), "timestep_last": round(t_last, 4),
                "fraction": round(t_last / t_first, 4) if t_first > 0 else None}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        order = ["format", "sigmas", "timesteps", "steps", "nfe", "solver", "prediction", "convention",
                 "convention_config", "method", "model", "objective", "provenance"]
        if self.conditioning is not None:
            order.append("conditioning")
        if self.olss is not None:
            order.append("olss")
        return {k: d[k] for k in order}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON, atomically."""
        self.validate()
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TimestepTable:
        if not isinstance(d, dict):
            raise StepsmithError(f"invalid timestep table: the JSON must be an object, got {_describe(d)}")
        check_field_types(d)
        if d.get("format") != FORMAT:
            raise StepsmithError(f"invalid timestep table: format: expected {FORMAT!r}, got {d.get('format')!r}")
        required = ["sigmas", "timesteps", "solver", "prediction", "convention", "method", "model"]
        missing = [k for k in required if k not in d]
        if missing:
            raise StepsmithError(f"invalid timestep table: missing field(s) {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known)
        if extra:
            raise StepsmithError(f"invalid timestep table: unknown field(s) {', '.join(extra)}")
        return cls(**d)

    def check_compatible(self, convention: Convention, prediction: str | None = None,
                         what: str = "this model") -> None:
        """Refuse a table made for another convention or noise schedule, before any model call."""
        if self.convention != convention.name:
            raise StepsmithError(
                f"table {self.method!r} was made for a {self.convention} model but {what} is {convention.name}; "
                f"search a table for it (stepsmith search --model ...)"
            )
        # conventions with a noise schedule (VP's ᾱ) record its hash; a table for another schedule is refused
        mine = self.convention_config.get("alphas_cumprod_sha256")
        theirs = convention.config().get("alphas_cumprod_sha256")
        if mine is not None and theirs is not None and mine != theirs:
            raise StepsmithError(
                f"table was made for another VP noise schedule (ᾱ hash {mine} vs {theirs} of {what}); "
                "search a table for this model"
            )
        if prediction is not None and self.prediction != prediction:
            raise StepsmithError(
                f"table was made for a {self.prediction}-prediction model but {what} predicts {prediction}"
            )
        _remember(convention)
        self.check_timesteps(convention)


    def check_conditioning(self, conditioning: Any) -> str | None:
        """Warn (``UserWarning``) when this table was searched for another guidance scale or condition set
        than ``conditioning`` (a :class:`~schedules.conditioning.Conditioning`, or None); returns the message.

        Baseline tables (no ``conditioning`` block) never warn: they do not depend on the conditioning.
        """
        if self.conditioning is None:
            return None
        from schedules.conditioning import warn_if_mismatch

        return warn_if_mismatch(self, conditioning)


OLSS_VERSION = 1


def check_olss(block: dict[str, Any] | None, solver: str, steps: int, prediction: str) -> None:
    """Refuse an ``olss`` block that does not fit its table: solver "olss" ⇔ a block; version 1; the table's
    prediction; one coefficient row per step, row k holding k+2 finite numbers (x_T, outputs 0..k)."""
    def bad(why: str, fix: str) -> StepsmithError:
        return StepsmithError(f"invalid timestep table: olss: {why} — {fix}", param="olss")

    if block is None:
        if solver == "olss":
            raise bad("solver 'olss' needs the olss block (its coefficients)", "rebuild it with --method olss")
        return
    if solver != "olss":
        raise bad(f"an olss block goes with solver 'olss', not {solver!r}", "set solver to 'olss' or drop the block")
    if block.get("version") != OLSS_VERSION:
        raise bad(f"version {block.get('version')!r} is not {OLSS_VERSION}", "rebuild the table with this stepsmith")
    if block.get("prediction") != prediction:
        raise bad(f"prediction {block.get('prediction')!r} differs from the table's {prediction!r}",
                  "the coefficients combine this prediction type's outputs: rebuild the table")
    g = block.get("guidance")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)):
        raise bad(f"guidance must be a number or null, got {_describe(g)}", "store the guidance scale used")
    rows = block.get("coefficients")
    if not isinstance(rows, list) or len(rows) != steps:
        n = len(rows) if isinstance(rows, list) else _describe(rows)
        raise bad(f"coefficients must be a list of {steps} rows (one per step), got {n}", "rebuild the table")
    for k, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) == k + 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)
        if not ok:
            raise bad(f"coefficient row {k} must hold {k + 2} finite numbers (x_T and outputs 0..{k}), got "
                      f"{_describe(row)}", "rebuild the table")


def _floats(values: Any, name: str) -> list[float]:
    """``values`` as a list of floats (lists, tuples, tensors, arrays); a wrong type names the field."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise StepsmithError(f"invalid timestep table: `{name}` must be a list of numbers, got {_describe(values)}",
                             param=name)
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (str, bytes, bool)):
            raise StepsmithError(f"invalid timestep table: `{name}` must be a list of numbers, got "
                                 f"{_describe(v)} at index {i}", param=name)
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise StepsmithError(f"invalid timestep table: `{name}` must be a list of numbers, got "
                                 f"{_describe(v)} at index {i}", param=name) from None
    return out


def as_table(table: Any, param: str = "table") -> TimestepTable:
    """A :class:`TimestepTable` from a table, a table dict (``to_dict()`` layout) or a path to table JSON."""
    if isinstance(table, TimestepTable):
        return table
    if isinstance(table, (str, os.PathLike)):
        return load_table(table)
    if isinstance(table, dict):
        return TimestepTable.from_dict(table)
    raise StepsmithError(f"`{param}` must be a TimestepTable, a table dict or the path of a table JSON file "
                         f"(load one with schedules.load_table), got {_describe(table)}", param=param)


def load_table(path: str | Path) -> TimestepTable:
    """Read and validate a ``stepsmith.schedule/v1`` JSON table."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise StepsmithError(f"`path` must be the path of a table JSON file (str or Path), got {_describe(path)}",
                             param="path")
    path = Path(path)
    if path.is_dir():
        raise StepsmithError(f"table {path} is a directory; give the table's JSON file (e.g. {path / 'table.json'})")
    if not path.is_file():
        raise StepsmithError(f"table {path} does not exist; create one with `stepsmith search`")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StepsmithError(f"table {path} is not valid JSON ({exc})") from None
    try:
        return TimestepTable.from_dict(d)
    except StepsmithError as exc:  # a field of the file, not a Python parameter: quote it as JSON does
        quoted = re.sub(r"`([A-Za-z_]+)`", r'"\1"', str(exc))
        raise StepsmithError(f"{path}: {quoted}") from None
    except TypeError as exc:
        raise StepsmithError(f"{path}: invalid timestep table ({exc})") from None
