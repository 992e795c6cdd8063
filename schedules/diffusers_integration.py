"""Plug stepsmith timestep tables into diffusers pipelines and schedulers.

Two entry points::

    from schedules.diffusers_integration import pipeline_kwargs, apply_table
    image = pipe(prompt, **pipeline_kwargs(table, pipe)).images   # any pipeline
    apply_table(table, scheduler)                                  # hand-driven loops

Both refuse — before any model call — a table whose convention, prediction type or
noise schedule (ᾱ) differs from the scheduler's config, and a table whose *solver*
the scheduler cannot replay.

Which table solver runs on which scheduler
-------------------------------------------
A table is searched for one solver; replaying it with another update rule gives other
samples. The scheduler that runs the table must therefore do the same arithmetic as
:func:`schedules.solvers.sample` (verified numerically in ``tests/test_diffusers_*``):

========================  =================================  ==================================
table                     scheduler (as configured)          how the table gets in
========================  =================================  ==================================
flow, euler/ddim          FlowMatchEulerDiscreteScheduler    ``sigmas=`` (N values, 0 appended);
                                                             ``shift`` compensated (pre-shift
                                                             values), dynamic shifting (Flux
                                                             ``mu``) disabled on a copy
flow, euler/ddim          UniPCMultistepScheduler            ``sigmas=`` (use_flow_sigmas; copy with
                          (use_flow_sigmas)                  solver_order=1, corrector off = DDIM;
                                                             ``flow_shift`` compensated)
vp, euler/ddim            EulerDiscreteScheduler             ``sigmas=`` (N+1 EDM sigmas, ending 0)
vp, euler/ddim            DPMSolverMultistepScheduler        ``timesteps=`` (integers), copy with
                                                             solver_order=1 (DDIM = DPM-Solver-1)
vp, dpmpp-2m              DPMSolverMultistepScheduler        ``timesteps=``, solver_order=2,
                                                             dpmsolver++, midpoint
vp, heun                  HeunDiscreteScheduler              ``timesteps=`` (integers)
vp (EDM σ), euler/ddim    EDMEulerScheduler                  ``sigmas=`` (the ramp that its
                                                             karras/exponential map sends to σ)
========================  =================================  ==================================

Where the scheduler's config would change the arithmetic (karras/exponential/beta sigma
flags, ``final_sigmas_type="sigma_min"``, thresholding, another solver order, SDE
variants, stochastic sampling) a *copy* with the neutral setting is used, and a warning
says what changed. Schedulers that cannot take a custom schedule or run another solver
(DDPM — stochastic —, DDIM, PNDM, LMS, EulerAncestral, DEIS, KDPM2, FlowMatchHeun, ...)
are replaced by the equivalent deterministic scheduler of the table's solver: flow
euler → FlowMatchEuler, vp euler/ddim → DPMSolverMultistep(order 1), vp dpmpp-2m →
DPMSolverMultistep(order 2), vp heun → HeunDiscrete, flow heun → FlowMatchHeun;
``swap=False`` raises instead, listing the supported schedulers.

Timesteps that are not integers (a VP table searched in continuous σ) cannot go through
``timesteps=`` of DPMSolverMultistep/Heun (they cast or interpolate linearly); such tables,
and pipelines whose ``__call__`` takes neither ``timesteps=`` nor ``sigmas=``
(DDPMPipeline, DDIMPipeline, community pipelines), get the table *installed*: the
pipeline's scheduler is replaced by a pinned copy whose ``set_timesteps`` always sets
exactly the table, and :func:`pipeline_kwargs` returns ``{"num_inference_steps": K}``.
:func:`remove_table` (or the :func:`plugged` context manager) restores the original.
The pinned scheduler saves (``save_pretrained``) as its diffusers base class, without
the table.

Model calls: euler/ddim/dpmpp-2m K, heun 2K-1 per batch (CFG doubles the batch, not
the calls).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schedules.adapters import convention_from_scheduler_config
from schedules.conventions import Convention, FlowConvention, inverse_shift
from schedules.io import StepsmithError
from schedules.table import TimestepTable

logger = logging.getLogger("stepsmith.diffusers")

# scheduler class name -> (conventions it can run, table solvers it replays, how the table enters)
SUPPORTED: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "FlowMatchEulerDiscreteScheduler": (("flow",), ("euler", "ddim"), "sigmas"),
    "UniPCMultistepScheduler": (("flow",), ("euler", "ddim"), "sigmas"),
    "EulerDiscreteScheduler": (("vp",), ("euler", "ddim"), "sigmas"),
    "DPMSolverMultistepScheduler": (("vp",), ("euler", "ddim", "dpmpp-2m"), "timesteps"),
    "HeunDiscreteScheduler": (("vp",), ("heun",), "timesteps"),
    "EDMEulerScheduler": (("vp",), ("euler", "ddim"), "sigmas"),
    "FlowMatchHeunDiscreteScheduler": (("flow",), ("heun",), "install"),
}

_EPS_T = 1e-3  # tolerance on model timesteps (1000-step scale) after float32 round trips
_RTOL_SIGMA = 1e-4


def supported_schedulers() -> str:
    return ", ".join(f"{k} ({'/'.join(v[0])}: {'/'.join(v[1])})" for k, v in SUPPORTED.items())


# --------------------------------------------------------------------------- conventions


def scheduler_convention(scheduler) -> tuple[Convention, str]:
    """(convention, prediction) the scheduler's config describes (EDM schedulers: VP in EDM σ)."""
    cfg = dict(scheduler.config)
    cfg["_class_name"] = type(scheduler).__name__ if not hasattr(scheduler, "_stepsmith_base") else \
        scheduler._stepsmith_base.__name__
    if cfg["_class_name"].startswith("EDM"):
        pred = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}.get(cfg.get("prediction_type", "epsilon"))
        if pred is None:
            raise StepsmithError(f"{cfg['_class_name']} has prediction_type {cfg.get('prediction_type')!r}; unsupported")
        return _EDMConventionMarker(), pred
    if cfg.get("use_flow_sigmas"):
        return FlowConvention(time_scale=float(cfg.get("num_train_timesteps", 1000))), "flow"
    return convention_from_scheduler_config(cfg)


class _EDMConventionMarker:
    """EDM-preconditioned models (EDMEuler): native sigma = EDM σ, no ᾱ to compare."""

    name = "vp"


def check_table(table: TimestepTable, scheduler, what: str = "this pipeline") -> None:
    """Refuse a table made for another convention, prediction type, ᾱ or time scale."""
    table.validate()
    conv, pred = scheduler_convention(scheduler)
    cfg = dict(scheduler.config, _class_name=_base_class(scheduler).__name__)
    if isinstance(conv, _EDMConventionMarker):
        if table.convention != "vp" or table.prediction != pred:
            raise StepsmithError(
                f"{what} uses an EDM scheduler ({pred}-prediction, EDM sigmas); the table is a "
                f"{table.convention}/{table.prediction} table — search a table for this model"
            )
        lo, hi = float(scheduler.config.sigma_min), float(scheduler.config.sigma_max)
        s = table.sigmas[:-1]
        if s[0] > hi * (1 + 1e-5) or s[-1] < lo * (1 - 1e-5):
            raise StepsmithError(f"table sigmas [{s[-1]:.4g}, {s[0]:.4g}] leave the EDM scheduler's range [{lo:.4g}, {hi:.4g}]")
        logger.warning("EDM scheduler: stepsmith cannot compare ᾱ (EDM models have none); the network receives "
                       "EDM c_noise(σ), not the table's discrete timesteps")
        return
    if cfg.get("invert_sigmas"):
        raise StepsmithError(f"{cfg['_class_name']} with invert_sigmas=True (Mochi) feeds the network 1-σ; "
                             "stepsmith's flow convention does not model it")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise StepsmithError(f"{cfg['_class_name']} with timestep_type={cfg['timestep_type']!r} feeds the network "
                             "EDM-style continuous time, which stepsmith's VP convention does not model")
    table.check_compatible(conv, pred, what=what)
    if isinstance(conv, FlowConvention):
        mine = float(table.convention_config.get("time_scale", conv.time_scale))
        if mine not in (1.0, conv.time_scale):
            raise StepsmithError(f"table time scale {mine:g} differs from {what}'s num_train_timesteps {conv.time_scale:g}")


def _expected_model_timesteps(table: TimestepTable, scheduler) -> list[float]:
    """What the network receives at each evaluated node (table.timesteps, rescaled for flow)."""
    conv, _ = scheduler_convention(scheduler)
    if isinstance(conv, FlowConvention):
        return [s * conv.time_scale for s in table.sigmas[:-1]]
    return list(table.timesteps)


def model_timesteps(table: TimestepTable, scheduler) -> list[float]:
    """The timesteps the denoiser receives, in call order (Heun: each interior node twice)."""
    ts = _expected_model_timesteps(table, scheduler) if not _is_edm(scheduler) else \
        [0.25 * math.log(s) for s in table.sigmas[:-1]]
    if table.solver == "heun":
        return [ts[0]] + [t for t in ts[1:] for _ in range(2)]
    return ts


def _is_edm(scheduler) -> bool:
    return _base_class(scheduler).__name__.startswith("EDM")


def _base_class(scheduler) -> type:
    return getattr(scheduler, "_stepsmith_base", type(scheduler))


# --------------------------------------------------------------------------- scheduler choice


def _neutral_overrides(name: str, cfg: dict, table: TimestepTable) -> dict[str, Any]:
    """Config values that make ``name`` do exactly the table solver's arithmetic."""
    no_sched = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
    if name == "FlowMatchEulerDiscreteScheduler":
        return {**no_sched, "use_dynamic_shifting": False, "shift_terminal": None, "stochastic_sampling": False}
    if name == "UniPCMultistepScheduler":
        return {**no_sched, "use_dynamic_shifting": False, "shift_terminal": None, "solver_order": 1,
                "predict_x0": True, "thresholding": False, "final_sigmas_type": "zero",
                "disable_corrector": list(range(max(table.steps, 1) + 1))}
    # Euler/Heun keep the state x/α. Their init_noise_sigma is sqrt(σ0²+1) (unit-variance x, as our
    # solvers start) except with timestep_spacing linspace/trailing, where it is σ0; the spacing has
    # no other effect once the table sets the schedule.
    if name == "EulerDiscreteScheduler":
        return {"timestep_spacing": "leading"}
    if name == "DPMSolverMultistepScheduler":
        order = 2 if table.solver == "dpmpp-2m" else 1
        return {**no_sched, "use_lu_lambdas": False, "use_flow_sigmas": False, "solver_order": order,
                "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "final_sigmas_type": "zero",
                "thresholding": False, "lower_order_final": True, "euler_at_final": False, "variance_type": None}
    if name == "HeunDiscreteScheduler":
        return {**no_sched, "clip_sample": False, "timestep_spacing": "leading"}
    if name == "EDMEulerScheduler":
        return {"final_sigmas_type": "zero"}
    if name == "FlowMatchHeunDiscreteScheduler":
        return {}
    return {}


def _target_class(table: TimestepTable) -> str:
    if table.convention == "flow":
        return "FlowMatchHeunDiscreteScheduler" if table.solver == "heun" else \
            ("FlowMatchEulerDiscreteScheduler" if table.solver in ("euler", "ddim") else "")
    return {"euler": "DPMSolverMultistepScheduler", "ddim": "DPMSolverMultistepScheduler",
            "dpmpp-2m": "DPMSolverMultistepScheduler", "heun": "HeunDiscreteScheduler"}[table.solver]


def _fresh(cls_name: str, cfg: dict, overrides: dict) -> Any:
    import diffusers

    cls = getattr(diffusers, cls_name)
    base = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if cls_name.startswith("FlowMatch"):
        base.setdefault("shift", 1.0)
    return cls.from_config({**base, **overrides})


def scheduler_for_table(table: TimestepTable, scheduler, *, swap: bool = True,
                        what: str = "this pipeline") -> tuple[Any, str | None]:
    """The scheduler that replays ``table`` exactly: ``scheduler`` itself, or a new one.

    Returns ``(scheduler, message)``; the message (also logged as a warning) says what was
    swapped or reconfigured and why. ``swap=False`` raises instead of swapping.
    """
    check_table(table, scheduler, what)
    base = _base_class(scheduler)
    name = base.__name__
    cfg = dict(scheduler.config)
    conv_ok = name in SUPPORTED and table.convention in SUPPORTED[name][0]
    if name == "UniPCMultistepScheduler" and not cfg.get("use_flow_sigmas"):
        conv_ok = False
    if name == "DPMSolverMultistepScheduler" and cfg.get("use_flow_sigmas"):
        conv_ok = False
    solver_ok = conv_ok and table.solver in SUPPORTED[name][1]
    if solver_ok:
        over = _neutral_overrides(name, cfg, table)
        changed = {k: v for k, v in over.items() if k in cfg and cfg[k] != v}
        if not changed:
            return scheduler, None
        if not swap:
            raise StepsmithError(
                f"{name} is configured with {', '.join(f'{k}={cfg[k]!r}' for k in changed)}, which changes the "
                f"{table.solver} arithmetic the table was searched for; set {changed} or pass swap=True"
            )
        new = _fresh(name, cfg, over)
        shown = {k: v for k, v in changed.items() if k != "disable_corrector"}
        if "disable_corrector" in changed:
            shown["corrector"] = "off"
        msg = (f"stepsmith: running the {table.solver} table on a copy of {name} with "
               f"{', '.join(f'{k}={v!r}' for k, v in shown.items())} (the configured values would change the solver)")
        logger.warning(msg)
        return new, msg
    target = _target_class(table)
    if _is_edm(scheduler):  # EDM-preconditioned networks need an EDM scheduler (c_in, c_noise)
        target = "EDMEulerScheduler" if table.solver in ("euler", "ddim") else ""
    if not target:
        raise StepsmithError(f"no diffusers scheduler replays a {table.convention} {table.solver} table; "
                             f"supported: {supported_schedulers()}")
    why = (f"{name} cannot replay a {table.convention} {table.solver} table"
           + (" (it samples stochastically)" if name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler") else "")
           + (" (it takes no custom schedule)" if name not in SUPPORTED and name != "DDPMScheduler" else ""))
    if not swap:
        raise StepsmithError(f"{why}; use one of: {supported_schedulers()} — or pass swap=True")
    new = _fresh(target, cfg, _neutral_overrides(target, cfg, table))
    msg = f"stepsmith: {why}; swapped in {target} (same noise schedule), which replays it exactly"
    logger.warning(msg)
    return new, msg


# --------------------------------------------------------------------------- set_timesteps arguments


def _all_integer(ts: list[float]) -> bool:
    return all(float(t).is_integer() for t in ts)


def _flow_pre_shift(scheduler, sigmas: list[float], shift_key: str) -> list[float]:
    shift = float(scheduler.config.get(shift_key, 1.0) or 1.0)
    if shift == 1.0:
        return sigmas
    return [float(inverse_shift(torch.tensor(s, dtype=torch.float64), shift)) for s in sigmas]


def native_kwargs(table: TimestepTable, scheduler) -> dict[str, Any] | None:
    """``set_timesteps`` keyword arguments that realise the table on ``scheduler`` exactly.

    ``None`` when the public arguments cannot express it (fractional timesteps on a
    ``timesteps=`` scheduler, FlowMatchHeun, a pinned scheduler); then the table is installed.
    The scheduler must already be the one :func:`scheduler_for_table` returned.
    """
    name = _base_class(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        return {"sigmas": _flow_pre_shift(scheduler, table.sigmas[:-1], "shift")}
    if name == "UniPCMultistepScheduler":
        # UniPC casts σ·T to int64 timesteps and moves σ=1 to 1-1e-6: only integral σ·T below T are exact
        T = float(scheduler.config.num_train_timesteps)
        if not all(float(s * T).is_integer() for s in table.sigmas[:-1]) or table.sigmas[0] * T > T - 1:
            return None
        # UniPC does array arithmetic on the values it is given: pass a numpy array
        return {"sigmas": np.asarray(_flow_pre_shift(scheduler, table.sigmas[:-1], "flow_shift"), dtype=np.float64)}
    if name == "EulerDiscreteScheduler":
        return {"sigmas": list(table.sigmas)}
    if name in ("DPMSolverMultistepScheduler", "HeunDiscreteScheduler"):
        if not _all_integer(table.timesteps):
            return None
        return {"timesteps": [int(t) for t in table.timesteps]}
    if name == "EDMEulerScheduler":
        if scheduler.config.sigma_schedule != "karras":  # its exponential schedule ignores the values given
            return None
        return {"sigmas": torch.tensor(_edm_ramp(scheduler, table.sigmas[:-1]), dtype=torch.float64)}
    return None


def _edm_ramp(scheduler, sigmas: list[float]) -> list[float]:
    """The ramp values EDMEuler's karras map sends onto exactly these sigmas."""
    c = scheduler.config
    lo, hi, rho = float(c.sigma_min), float(c.sigma_max), float(c.rho)
    a, b = hi ** (1 / rho), lo ** (1 / rho)
    return [(s ** (1 / rho) - a) / (b - a) for s in sigmas]


# --------------------------------------------------------------------------- installing


def _install(scheduler, table: TimestepTable, device=None) -> None:
    """Set the scheduler's state to exactly the table, through set_timesteps where possible."""
    base = _base_class(scheduler)
    kw = native_kwargs(table, scheduler)
    if kw is not None:
        base.set_timesteps(scheduler, device=device, **kw)
    else:
        _install_direct(scheduler, base, table, device)
    verify_scheduler(table, scheduler)


def _install_direct(scheduler, base: type, table: TimestepTable, device=None) -> None:
    """Reset all solver state with set_timesteps(K), then write the table's sigmas/timesteps.

    Used where the public arguments cannot carry the table (fractional timesteps, FlowMatchHeun,
    dynamic shifting). Each scheduler's ``step`` reads ``self.sigmas[step_index]``; timesteps
    only locate the step index and go to the network.
    """
    name = base.__name__
    K = table.steps
    params = inspect.signature(base.set_timesteps).parameters
    extra = {"mu": 0.0} if "mu" in params and scheduler.config.get("use_dynamic_shifting") else {}
    base.set_timesteps(scheduler, K, device=device, **extra)
    ts = torch.tensor(model_timesteps(table, scheduler), dtype=torch.float32, device=device)
    sig = torch.tensor(table.sigmas, dtype=torch.float32, device=device)
    if name in ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        sig = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
    elif name == "EDMEulerScheduler":
        ts = scheduler.precondition_noise(sig[:-1])
    elif name not in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
                      "EulerDiscreteScheduler"):
        raise StepsmithError(f"cannot install a table on {name}; supported: {supported_schedulers()}")
    scheduler.timesteps = ts
    scheduler.sigmas = sig.to("cpu") if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler") else sig
    scheduler.num_inference_steps = K
    if name == "EulerDiscreteScheduler":
        # init_noise_sigma / scale_model_input read self.sigmas; nothing else caches the schedule
        pass


def verify_scheduler(table: TimestepTable, scheduler) -> None:
    """Raise unless the scheduler now holds exactly the table (sigmas and model timesteps)."""
    name = _base_class(scheduler).__name__
    got_t = [float(v) for v in scheduler.timesteps.tolist()]
    want_t = model_timesteps(table, scheduler)
    got_s = [float(v) for v in scheduler.sigmas.tolist()]
    want_s = list(table.sigmas)
    if name in ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        want_s = [want_s[0]] + [s for s in want_s[1:-1] for _ in range(2)] + [0.0]
    ok = len(got_t) == len(want_t) and len(got_s) == len(want_s)
    ok = ok and all(abs(a - b) <= _EPS_T * max(1.0, abs(b) / 1000) for a, b in zip(got_t, want_t))
    ok = ok and all(abs(a - b) <= _RTOL_SIGMA * max(abs(b), 1e-3) for a, b in zip(got_s, want_s))
    if not ok:
        raise StepsmithError(
            f"{name} did not take the table exactly (timesteps {got_t[:4]}... vs {want_t[:4]}..., sigmas "
            f"{got_s[:4]}... vs {want_s[:4]}...); this diffusers version behaves differently — please report it"
        )


def apply_table(table: TimestepTable, scheduler, *, device=None, swap: bool = False):
    """Set ``scheduler`` to run exactly ``table``; returns the scheduler to drive.

    For hand-written loops: ``sch = apply_table(table, sch)`` then iterate over
    ``sch.timesteps`` calling ``sch.scale_model_input`` / ``sch.step`` as usual. With
    ``swap=False`` (default) a scheduler that cannot replay the table's solver raises; with
    ``swap=True`` the equivalent scheduler is returned instead (see the module docstring).
    """
    sch, _ = scheduler_for_table(table, scheduler, swap=swap, what=type(scheduler).__name__)
    _install(sch, table, device)
    return sch


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
            f"with num_inference_steps={K} (or remove the table with schedules.diffusers_integration.remove_table)"
        )
    for given in (timesteps, sigmas):
        if given is not None and len(given) != K:
            raise StepsmithError(f"a {K}-step table is installed on this scheduler; do not pass a "
                                 f"{len(given)}-value schedule as well")
        if given is not None:
            logger.warning("stepsmith: the installed table overrides the schedule the pipeline passed")
    _install(self, table, device)


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
    scheduler, _ = scheduler_for_table(table, scheduler, swap=swap, what=_base_class(scheduler).__name__)
    base = _base_class(scheduler)
    pinned = _pinned_class(base).from_config(scheduler.config)
    pinned._stepsmith_table = table
    _install(pinned, table)
    return pinned


# --------------------------------------------------------------------------- pipelines


def _call_params(pipe) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


_SCALED = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "EDMEulerScheduler")


def _pipeline_scales_input(pipe) -> bool:
    """Whether ``pipe.__call__`` applies ``init_noise_sigma`` and ``scale_model_input``.

    Euler/Heun/EDM schedulers keep the state x/α and need both; DDPMPipeline and DDIMPipeline
    use neither.
    """
    src = ""
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers.pipelines.pipeline_utils") or cls is object:
            continue
        try:
            src += inspect.getsource(cls)
        except (OSError, TypeError):
            return True
    return "scale_model_input" in src and "init_noise_sigma" in src


def _pipe_name(pipe) -> str:
    src = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    return f"{type(pipe).__name__}({src})" if src else type(pipe).__name__


def _local_model_path(spec: str) -> Path | None:
    if not spec:
        return None
    if spec.startswith("builtin:"):
        from schedules.embedded import embedded_path

        return embedded_path(spec.split(":", 1)[1]).resolve()
    p = Path(spec)
    return p.resolve() if p.is_dir() else None


def check_model(table: TimestepTable, pipe) -> None:
    """Refuse a table recorded for another *local* model folder than the one ``pipe`` was loaded from.

    Only compares when both sides name a builtin model or an existing folder (flow models share
    one convention, so the name is the only identity a flow table carries).
    """
    mine = _local_model_path(table.model)
    theirs = _local_model_path(str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""))
    if mine is not None and theirs is not None and mine != theirs:
        raise StepsmithError(
            f"table was searched for {table.model} ({mine}) but the pipeline was loaded from {theirs}; "
            "search a table for this model, or pass allow_other_model=True if it is the same model copied elsewhere"
        )


def pipeline_kwargs(table: TimestepTable, pipe, *, swap: bool = True, allow_other_model: bool = False) -> dict[str, Any]:
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
    calling this before every generation costs well under a millisecond.
    """
    if not hasattr(pipe, "scheduler"):
        raise StepsmithError(f"{type(pipe).__name__} has no scheduler; pass a diffusers pipeline")
    if not allow_other_model:
        check_model(table, pipe)
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
    return copy.deepcopy(kw)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _table_key(table: TimestepTable) -> str:
    d = table.to_dict()
    d.pop("provenance", None)
    return json.dumps(d, sort_keys=True, default=str)


def _plan(table: TimestepTable, pipe, original, swap: bool) -> tuple[Any, dict[str, Any]]:
    """(scheduler to put on the pipe, kwargs for the call) — all checks happen here."""
    what = _pipe_name(pipe)
    sch, _ = scheduler_for_table(table, original, swap=swap, what=what)
    if _base_class(sch).__name__ in _SCALED and not _pipeline_scales_input(pipe):
        if table.solver in ("euler", "ddim") and table.convention == "vp":
            sch, _ = scheduler_for_table(table, _fresh("DDIMScheduler", dict(original.config), {}), swap=True, what=what)
        else:
            raise StepsmithError(
                f"{type(pipe).__name__} never calls scheduler.scale_model_input / init_noise_sigma, which "
                f"{_base_class(sch).__name__} needs to replay a {table.solver} table; use a euler/ddim/dpmpp-2m "
                "table (DPMSolverMultistep replays those without scaling) or a pipeline that scales its inputs"
            )
    params = _call_params(pipe)
    kw = native_kwargs(table, sch)
    if kw is not None:
        key = next(iter(kw))
        if key not in params and key == "sigmas" and type(sch).__name__ == "EulerDiscreteScheduler" \
                and "timesteps" in params and _all_integer(table.timesteps):
            kw = {"timesteps": [int(t) for t in table.timesteps]}
            key = "timesteps"
        if key in params:
            # dry run on a throw-away copy: the table is verified before any model call
            probe = type(sch).from_config(sch.config)
            probe.set_timesteps(**kw)
            verify_scheduler(table, probe)
            if sch is not original:
                sch._stepsmith_original = original
            return sch, kw
    if "num_inference_steps" not in params:
        raise StepsmithError(f"{type(pipe).__name__}.__call__ takes neither timesteps=, sigmas= nor "
                             "num_inference_steps=; drive its scheduler with apply_table()")
    pinned = pin_table(table, sch)
    pinned._stepsmith_original = original
    logger.warning("stepsmith: %s takes no custom schedule for this table; installed it on pipe.scheduler "
                   "(%s) — call with num_inference_steps=%d", type(pipe).__name__, _base_class(pinned).__name__, table.steps)
    return pinned, {"num_inference_steps": table.steps}


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
