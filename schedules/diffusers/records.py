"""One record per diffusers scheduler class that replays stepsmith tables exactly.

Everything stepsmith knows about a supported scheduler class is in its
:class:`SchedulerRecord`: which convention its config must describe, which table solvers
it replays, the config values that make it do exactly that solver's arithmetic, how a
table goes into ``set_timesteps``, whether its sigmas hold Heun's nodes twice, whether the
pipeline must scale its input, and for which tables it is swapped in. All dispatch in
:mod:`schedules.diffusers` goes through :func:`record_for`; adding a scheduler is adding
a record to :data:`RECORDS` (and a test that it replays our solver).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from schedules.conventions import EDMConvention, FlowConvention, VPConvention, inverse_shift
from schedules.table import TimestepTable

Entry = Callable[[TimestepTable, Any], "dict[str, Any] | None"]

# --------------------------------------------------------------------------- how a table enters set_timesteps
# Each entry returns the ``set_timesteps`` keyword arguments that realise the table exactly on a
# scheduler of the record's class (already neutrally configured), or None when those arguments
# cannot express it — then the table is installed (written into the scheduler's state).


def _pre_shift(scheduler, sigmas: list[float], shift_key: str) -> list[float]:
    """The values whose FlowMatch shift (config ``shift_key``) is exactly ``sigmas``."""
    shift = float(scheduler.config.get(shift_key, 1.0) or 1.0)
    if shift == 1.0:
        return sigmas
    return [float(inverse_shift(torch.tensor(s, dtype=torch.float64), shift)) for s in sigmas]


def flow_sigmas(table: TimestepTable, scheduler) -> dict[str, Any]:
    """FlowMatchEuler: ``sigmas=`` the N evaluated sigmas (it appends 0), shift compensated."""
    return {"sigmas": _pre_shift(scheduler, table.sigmas[:-1], "shift")}


def unipc_flow_sigmas(table: TimestepTable, scheduler) -> dict[str, Any] | None:
    """UniPC (use_flow_sigmas): casts σ·T to int64 timesteps and moves σ=1 to 1-1e-6, so only
    integral σ·T below T are exact; it does array arithmetic on the values (a numpy array).
    A VP UniPC takes no custom schedule (``sigmas=`` needs flow sigmas): installed."""
    if not scheduler.config.get("use_flow_sigmas"):
        return None
    T = float(scheduler.config.num_train_timesteps)
    if not all(float(s * T).is_integer() for s in table.sigmas[:-1]) or table.sigmas[0] * T > T - 1:
        return None
    pre = np.asarray(_pre_shift(scheduler, table.sigmas[:-1], "flow_shift"), dtype=np.float64)
    fs = float(scheduler.config.get("flow_shift", 1.0) or 1.0)
    back = fs * pre / (1 + (fs - 1) * pre)  # what its set_timesteps makes of them: the shift's round trip
    if not np.array_equal((back * T).astype(np.int64), np.round(np.asarray(table.sigmas[:-1]) * T).astype(np.int64)):
        return None
    return {"sigmas": pre}


def all_sigmas(table: TimestepTable, scheduler) -> dict[str, Any]:  # noqa: ARG001 - entry signature
    """EulerDiscrete: ``sigmas=`` all N+1 EDM sigmas, ending in 0."""
    return {"sigmas": list(table.sigmas)}


def integer_timesteps(table: TimestepTable, scheduler) -> dict[str, Any] | None:  # noqa: ARG001
    """``timesteps=`` — exact only for integral timesteps (these schedulers cast or interpolate)."""
    if not all(float(t).is_integer() for t in table.timesteps):
        return None
    return {"timesteps": [int(t) for t in table.timesteps]}


def edm_ramp_sigmas(table: TimestepTable, scheduler) -> dict[str, Any] | None:
    """EDMEuler: ``sigmas=`` the ramp its karras map sends onto exactly the table's sigmas
    (its exponential schedule ignores the values given: then the table is installed)."""
    c = scheduler.config
    if c.sigma_schedule != "karras":
        return None
    lo, hi, rho = float(c.sigma_min), float(c.sigma_max), float(c.rho)
    a, b = hi ** (1 / rho), lo ** (1 / rho)
    ramp = [(s ** (1 / rho) - a) / (b - a) for s in table.sigmas[:-1]]
    return {"sigmas": torch.tensor(ramp, dtype=torch.float64)}


def never(table: TimestepTable, scheduler) -> None:  # noqa: ARG001 - entry signature
    """No public argument takes a table (FlowMatchHeun): always installed."""
    return None


# --------------------------------------------------------------------------- neutral configurations
# Config values that make the class do exactly the table solver's arithmetic; a scheduler
# configured otherwise is replaced by a copy with these values (and a warning says so).

NO_SIGMA_SCHEDULE = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
# Euler/Heun keep the state x/α. Their init_noise_sigma is sqrt(σ0²+1) (unit-variance x, as our
# solvers start) except with timestep_spacing linspace/trailing, where it is σ0; the spacing has
# no other effect once the table sets the schedule.
LEADING = {"timestep_spacing": "leading"}
def _fixed(values: dict[str, Any]) -> Callable[[TimestepTable], dict[str, Any]]:
    return lambda table: dict(values)  # noqa: ARG005 - the same for every table


def _unipc_neutral(table: TimestepTable) -> dict[str, Any]:
    """UniPC as DDIM (order 1, corrector off at every step) or, for a ``unipc`` table, as our unipc solver:
    order 2, bh2, corrector at every step, first order on the last; x0 prediction; flow or VP sigmas."""
    kind = ({"use_flow_sigmas": True, "prediction_type": "flow_prediction"} if table.convention == "flow"
            else {"use_flow_sigmas": False})
    order = ({"solver_order": 2, "solver_type": "bh2", "lower_order_final": True, "disable_corrector": []}
             if table.solver == "unipc" else
             {"solver_order": 1, "disable_corrector": list(range(max(table.steps, 1) + 1))})
    return {**NO_SIGMA_SCHEDULE, "use_dynamic_shifting": False, "shift_terminal": None, "predict_x0": True,
            "thresholding": False, "final_sigmas_type": "zero", **kind, **order}


def _dpm_multistep_neutral(table: TimestepTable) -> dict[str, Any]:
    """DPMSolverMultistep: order 1 (= DDIM) or 2 (DPM-Solver++(2M), midpoint), ending at σ=0."""
    return {**NO_SIGMA_SCHEDULE, "use_lu_lambdas": False, "use_flow_sigmas": False,
            "solver_order": 2 if table.solver == "dpmpp-2m" else 1, "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint", "final_sigmas_type": "zero", "thresholding": False,
            "lower_order_final": True, "euler_at_final": False, "variance_type": None}


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class SchedulerRecord:
    """What stepsmith knows about one diffusers scheduler class."""

    name: str  # the diffusers class name (resolved lazily: importing diffusers is slow)
    convention: type | tuple[type, ...]  # the Convention class(es) its config may describe (FlowConvention, ...)
    solvers: tuple[str, ...]  # table solvers it replays, neutrally configured
    neutral: Callable[[TimestepTable], dict[str, Any]]  # config values for exactly that arithmetic
    entries: tuple[Entry, ...]  # set_timesteps arguments, in order of preference; none fits: installed
    replaces: tuple[str, ...] = ()  # table solvers for which it is swapped in for schedulers that cannot run them
    heun_nodes: bool = False  # its sigmas hold every interior node twice (Heun's two evaluations)
    scales_input: bool = False  # keeps the state x/α: the pipeline must apply init_noise_sigma and scale_model_input
    sigmas_on_cpu: bool = False  # keeps self.sigmas on the CPU (an installed table must too)
    installed_timesteps: Callable[[Any, torch.Tensor], torch.Tensor] | None = None  # model times from float32 sigmas

    @property
    def cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.name)

    def describe(self) -> str:
        convs = self.convention if isinstance(self.convention, tuple) else (self.convention,)
        return f"{self.name} ({'/'.join(c.name for c in convs)}: {'/'.join(self.solvers)})"


def _edm_noise(scheduler, sigmas: torch.Tensor) -> torch.Tensor:
    """EDMEuler's own c_noise of the installed sigmas (bit-identical to its set_timesteps)."""
    return scheduler.precondition_noise(sigmas[:-1])


RECORDS: tuple[SchedulerRecord, ...] = (
    SchedulerRecord("FlowMatchEulerDiscreteScheduler", FlowConvention, ("euler", "ddim"),
                    _fixed({**NO_SIGMA_SCHEDULE, "use_dynamic_shifting": False, "shift_terminal": None,
                            "stochastic_sampling": False}),
                    (flow_sigmas,), replaces=("euler", "ddim")),
    SchedulerRecord("UniPCMultistepScheduler", (FlowConvention, VPConvention), ("euler", "ddim", "unipc"),
                    _unipc_neutral, (unipc_flow_sigmas,), replaces=("unipc",), sigmas_on_cpu=True),
    SchedulerRecord("EulerDiscreteScheduler", VPConvention, ("euler", "ddim"), _fixed(LEADING),
                    (all_sigmas, integer_timesteps), scales_input=True),
    SchedulerRecord("DPMSolverMultistepScheduler", VPConvention, ("euler", "ddim", "dpmpp-2m"),
                    _dpm_multistep_neutral, (integer_timesteps,), replaces=("euler", "ddim", "dpmpp-2m"),
                    sigmas_on_cpu=True),
    SchedulerRecord("HeunDiscreteScheduler", VPConvention, ("heun",),
                    _fixed({**NO_SIGMA_SCHEDULE, "clip_sample": False, **LEADING}), (integer_timesteps,),
                    replaces=("heun",), heun_nodes=True, scales_input=True),
    SchedulerRecord("EDMEulerScheduler", EDMConvention, ("euler", "ddim"), _fixed({"final_sigmas_type": "zero"}),
                    (edm_ramp_sigmas,), replaces=("euler", "ddim"), scales_input=True,
                    installed_timesteps=_edm_noise),
    SchedulerRecord("FlowMatchHeunDiscreteScheduler", FlowConvention, ("heun",), _fixed({}), (never,),
                    replaces=("heun",), heun_nodes=True),
    # order 1 = DDIM (its order-2/3 steps are single-step DPM-Solver, not our dpmpp-2m);
    # lower_order_final=True, which its set_timesteps would otherwise force on the config
    SchedulerRecord("DPMSolverSinglestepScheduler", VPConvention, ("euler", "ddim"),
                    _fixed({**NO_SIGMA_SCHEDULE, "use_flow_sigmas": False, "use_dynamic_shifting": False,
                            "solver_order": 1, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero",
                            "thresholding": False, "lower_order_final": True, "variance_type": None}),
                    (integer_timesteps,), sigmas_on_cpu=True),
)

# Schedulers without a record that sample stochastically (said when they are swapped out).
STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler")


@functools.cache
def _registry() -> dict[type, SchedulerRecord]:
    return {r.cls: r for r in RECORDS}


def base_class(scheduler) -> type:
    """The diffusers class a scheduler is (a pinned copy's is the class it was made from)."""
    return getattr(scheduler, "_stepsmith_base", type(scheduler))


def record_for(scheduler) -> SchedulerRecord | None:
    """The record of the scheduler's class or of its nearest recorded base class (MRO)."""
    registry = _registry()
    return next((registry[c] for c in type(scheduler).__mro__ if c in registry), None)


def is_edm_family(scheduler) -> bool:
    """EDM-preconditioned schedulers (c_in, c_noise): the record says so; diffusers names the
    ones without a record (EDMDPMSolverMultistepScheduler) with the EDM prefix."""
    record = record_for(scheduler)
    if record is not None:
        return record.convention is EDMConvention
    return base_class(scheduler).__name__.startswith("EDM")


def swap_target(convention, solver: str, *, unscaled: bool = False) -> SchedulerRecord | None:
    """The record swapped in to replay a ``solver`` table of this convention (None: no scheduler can).

    ``unscaled`` skips records that need the pipeline to scale its input.
    """
    return next((r for r in RECORDS if isinstance(convention, r.convention) and solver in r.replaces
                 and not (unscaled and r.scales_input)), None)


def supported_schedulers() -> str:
    return ", ".join(r.describe() for r in RECORDS)
