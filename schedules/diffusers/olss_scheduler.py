"""``OLSSScheduler``: a diffusers scheduler that replays a stepsmith OLSS table (:mod:`schedules.search.olss`).

OLSS (Duan et al. 2023) writes each step as a fitted linear combination of the initial noise x_T and
every model output so far, so its scheduler must keep a history. Here the history lives only within
one run: ``set_timesteps`` resets it, the first ``step`` of a run (the table's first timestep) starts
it afresh, and the last step clears it — two pipeline calls with the same noise give the same images,
and the scheduler can be reused, copied or saved between runs (``save_pretrained`` stores the table in
its config). Unlike the reference code it refuses a step count other than the table's.

    from schedules.diffusers import pipeline_kwargs
    images = pipe(**pipeline_kwargs(olss_table, pipe)).images    # installs OLSSScheduler on pipe

The scheduler cannot see a pipeline's guidance scale: call the pipeline with the guidance the table
was fitted at (``scheduler.guidance``; ``None`` = unconditional) — other scales change the outputs
the coefficients combine.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from schedules.io import StepsmithError
from schedules.search.olss import combine
from schedules.table import TimestepTable, as_table

_T_TOL = 1e-3  # model timesteps (1000-step scale) after float32 round trips


def _base_scheduler(base):
    """A diffusers scheduler from a scheduler instance or a scheduler config dict naming its ``_class_name``."""
    if hasattr(base, "config") and hasattr(base, "set_timesteps"):
        return getattr(base, "_stepsmith_original", base)
    if isinstance(base, dict) or hasattr(base, "keys"):
        import diffusers

        name = base.get("_class_name")
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if cls is None:
            raise StepsmithError(f"`base_config` must name its diffusers scheduler class in `_class_name` (got {name!r}); "
                                 "pass pipe.scheduler or pipe.scheduler.config", param="base_config")
        return cls.from_config(dict(base))
    raise StepsmithError(f"`base_config` must be the pipeline's scheduler or its config, got {type(base).__name__}",
                         param="base_config")


class OLSSScheduler(SchedulerMixin, ConfigMixin):
    """Replays the K fitted steps of an OLSS table; ``order = 1``, ``init_noise_sigma = 1``, no input scaling.

    Build it with :meth:`from_table` (checks the table against the pipeline's scheduler: convention,
    noise schedule, prediction type) or let :func:`schedules.diffusers.pipeline_kwargs` install it.
    """

    order = 1
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, table: dict | None = None, model_timesteps: list[float] | None = None,
                 num_train_timesteps: int = 1000):  # noqa: ARG002 - kept in the config (len(scheduler))
        if table is None or model_timesteps is None:
            raise StepsmithError("OLSSScheduler needs an OLSS table: build it with OLSSScheduler.from_table(table, "
                                 "pipe.scheduler)", param="table")
        self.table = TimestepTable.from_dict(dict(table))
        if self.table.olss is None:
            raise StepsmithError(f"table {self.table.method!r} (solver {self.table.solver!r}) has no OLSS "
                                 "coefficients; build one with --method olss", param="table")
        if len(model_timesteps) != self.table.steps:
            raise StepsmithError(f"{len(model_timesteps)} model timesteps for a {self.table.steps}-step table",
                                 param="model_timesteps")
        self.init_noise_sigma = 1.0
        self.num_inference_steps = self.table.steps
        self._reset()
        self.timesteps = torch.tensor([float(t) for t in model_timesteps], dtype=torch.float32)
        self.sigmas = torch.tensor(self.table.sigmas, dtype=torch.float32)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_table(cls, table: TimestepTable | str | dict, base_config: Any) -> OLSSScheduler:
        """The scheduler replaying ``table`` for a pipeline whose scheduler (or its config) is ``base_config``."""
        from schedules.diffusers.detect import check_table, model_timesteps

        table = as_table(table)
        if table.olss is None:
            raise StepsmithError(f"table {table.method!r} (solver {table.solver!r}) is not an OLSS table; "
                                 "use pipeline_kwargs / apply_table for it", param="table")
        base = _base_scheduler(base_config)
        check_table(table, base, what=type(base).__name__)
        ts = model_timesteps(table, base)
        return cls(table=table.to_dict(), model_timesteps=ts,
                   num_train_timesteps=int(base.config.get("num_train_timesteps", 1000) or 1000))

    @property
    def guidance(self) -> float | None:
        """The guidance scale the coefficients were fitted at (None: unconditional)."""
        return self.table.olss.get("guidance")

    @property
    def prediction(self) -> str:
        return self.table.olss["prediction"]

    # ------------------------------------------------------------------ the diffusers interface
    def _reset(self) -> None:
        self._x_T: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None, **_kwargs) -> None:
        """Reset all state and put the table's K timesteps in ``self.timesteps`` (any other step count is refused)."""
        K = self.table.steps
        if num_inference_steps is not None and int(num_inference_steps) != K:
            raise StepsmithError(f"this OLSSScheduler replays a {K}-step table; call the pipeline with "
                                 f"num_inference_steps={K} (other step counts need another OLSS fit)",
                                 param="num_inference_steps")
        for name, given in (("timesteps", timesteps), ("sigmas", sigmas)):
            if given is not None:
                raise StepsmithError(f"an OLSS table fixes its own schedule; do not pass `{name}` as well", param=name)
        self._reset()
        self.timesteps = self.timesteps.to(device) if device is not None else self.timesteps
        self.num_inference_steps = K

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:  # noqa: ARG002
        return sample

    def _index(self, timestep: Any) -> int:
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        ts = self.timesteps.tolist()
        want = len(self._outputs)
        if want < len(ts) and abs(ts[want] - t) <= _T_TOL * max(1.0, abs(t) / 1000):
            return want
        if abs(ts[0] - t) <= _T_TOL * max(1.0, abs(t) / 1000):  # a new run without set_timesteps
            self._reset()
            return 0
        raise StepsmithError(f"OLSSScheduler.step got timestep {t:g} but the table's next timestep is "
                             f"{ts[want] if want < len(ts) else 'none (the run is over)'}; iterate over "
                             "scheduler.timesteps in order after set_timesteps")

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **_kwargs) -> SchedulerOutput | tuple[torch.Tensor]:
        """The next state: the table's combination of x_T (the first step's ``sample``) and every output so far."""
        k = self._index(timestep)
        if k == 0:
            self._x_T = sample
        self._outputs.append(model_output)
        x = combine(self.table.olss["coefficients"][k], self._x_T, self._outputs)
        if k == self.table.steps - 1:
            self._reset()  # nothing survives the run
        return SchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def olss_pipeline_kwargs(table: TimestepTable, pipe) -> dict[str, Any]:
    """Install an :class:`OLSSScheduler` for ``table`` on ``pipe`` (the original stays restorable by
    :func:`schedules.diffusers.remove_table`); returns ``{"num_inference_steps": K}``."""
    from schedules.diffusers.pipelines import _call_params

    original = getattr(pipe.scheduler, "_stepsmith_original", pipe.scheduler)
    if "num_inference_steps" not in _call_params(pipe):
        raise StepsmithError(f"{type(pipe).__name__}.__call__ takes no num_inference_steps=; drive an OLSSScheduler "
                             "(OLSSScheduler.from_table) by hand")
    sch = OLSSScheduler.from_table(table, original)
    sch._stepsmith_original = original
    pipe.scheduler = sch
    return {"num_inference_steps": table.steps}


__all__ = ["OLSSScheduler", "olss_pipeline_kwargs"]
