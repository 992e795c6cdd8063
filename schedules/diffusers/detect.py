"""Which convention a diffusers scheduler's config describes, and whether a table fits it."""

from __future__ import annotations

import logging

import torch

from schedules.adapters import convention_from_scheduler_config
from schedules.conventions import Convention, EDMConvention, FlowConvention, VPConvention
from schedules.diffusers.records import base_class, is_edm_family
from schedules.io import StepsmithError
from schedules.table import TimestepTable

logger = logging.getLogger("stepsmith.diffusers")

_EDM_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def scheduler_convention(scheduler) -> tuple[Convention, str]:
    """(convention, prediction) the scheduler's config describes (EDM schedulers: :class:`EDMConvention`)."""
    cfg = dict(scheduler.config, _class_name=base_class(scheduler).__name__)
    if is_edm_family(scheduler):
        pred = _EDM_PREDICTIONS.get(cfg.get("prediction_type", "epsilon"))
        if pred is None:
            raise StepsmithError(f"{cfg['_class_name']} has prediction_type {cfg.get('prediction_type')!r}; unsupported")
        return EDMConvention.from_scheduler_config(cfg), pred
    if cfg.get("use_flow_sigmas"):
        return FlowConvention(time_scale=float(cfg.get("num_train_timesteps", 1000))), "flow"
    return convention_from_scheduler_config(cfg)


def _check_edm(table: TimestepTable, conv: EDMConvention, pred: str, what: str) -> None:
    if table.convention != conv.name or table.prediction != pred:
        raise StepsmithError(
            f"{what} uses an EDM scheduler ({pred}-prediction, EDM sigmas); the table is a "
            f"{table.convention}/{table.prediction} table — search a table for this model"
        )
    problem = conv.check_sigmas(table.sigmas)
    if problem:
        raise StepsmithError(problem)
    logger.warning("EDM scheduler: stepsmith cannot compare ᾱ (EDM models have none); the network receives "
                   "EDM c_noise(σ), not the table's discrete timesteps")


def _refuse_unmodelled(cfg: dict, name: str) -> None:
    """Config options that feed the network a time stepsmith's conventions do not model."""
    if cfg.get("invert_sigmas"):
        raise StepsmithError(f"{name} with invert_sigmas=True (Mochi) feeds the network 1-σ; "
                             "stepsmith's flow convention does not model it")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise StepsmithError(f"{name} with timestep_type={cfg['timestep_type']!r} feeds the network "
                             "EDM-style continuous time, which stepsmith's VP convention does not model")


def check_table(table: TimestepTable, scheduler, what: str = "this pipeline") -> None:
    """Refuse a table made for another convention, prediction type, ᾱ or time scale."""
    table.validate()
    conv, pred = scheduler_convention(scheduler)
    if isinstance(conv, EDMConvention):
        _check_edm(table, conv, pred, what)
        return
    _refuse_unmodelled(dict(scheduler.config), base_class(scheduler).__name__)
    table.check_compatible(conv, pred, what=what)
    if isinstance(conv, FlowConvention):
        mine = float(table.convention_config.get("time_scale", conv.time_scale))
        if mine not in (1.0, conv.time_scale):
            raise StepsmithError(f"table time scale {mine:g} differs from {what}'s num_train_timesteps {conv.time_scale:g}")


def model_timesteps(table: TimestepTable, scheduler) -> list[float]:
    """The timesteps the denoiser receives, in call order (Heun: each interior node twice).

    VP tables carry the network's discrete timesteps exactly; otherwise they come from the
    scheduler's convention (flow: σ·num_train_timesteps, whatever time scale the table was
    searched on; EDM: c_noise).
    """
    conv, _ = scheduler_convention(scheduler)
    if isinstance(conv, VPConvention):
        ts = list(table.timesteps)
    else:
        ts = conv.model_time(torch.tensor(table.sigmas[:-1], dtype=torch.float64)).tolist()
    if table.solver == "heun":
        return [ts[0]] + [t for t in ts[1:] for _ in range(2)]
    return ts
