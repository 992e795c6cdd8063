"""Interchange: stepsmith tables to and from the sigma / timestep lists other tools use.

Export::

    table.to_sigmas()            # k-diffusion: float32 tensor of the K+1 sigmas, ending in 0
    to_comfy_sigmas(table)       # ComfyUI SIGMAS: the same values as a plain list of floats
    comfy_sigmas_tensor(table)   # ... or as the 1-D float tensor ComfyUI passes between nodes

ComfyUI's SIGMAS, like k-diffusion's, are in the model's own sigma space — EDM σ for
SD1.5/SDXL (VP), σ ∈ [0, 1] for SD3/Flux (flow) — with the terminal 0 included; that is
exactly a table's ``sigmas``.

Import (into a validated ``stepsmith.schedule/v1`` table)::

    table_from_sigmas([14.61, 6.47, ..., 0.0], scheduler=pipe.scheduler, solver="dpmpp-2m")
    table_from_timesteps([999, 850, ..., 24], scheduler=pipe.scheduler)
    table_from_ays("StableDiffusionXLTimesteps", scheduler=pipe.scheduler, solver="dpmpp-2m")

The model side is given once, as one of: ``adapter=`` (a :class:`~schedules.adapters.ModelAdapter`),
``scheduler=`` (a diffusers scheduler or its config dict — its convention, prediction type and
ᾱ are read from it), or ``convention=`` plus ``prediction=``. Flow sigmas are the values the
model sees (after any diffusers ``shift``). Published lists are rounded: values within 0.1 %
outside a VP model's σ range are clamped onto it; anything further out is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from schedules.conventions import Convention
from schedules.io import StepsmithError
from schedules.table import TimestepTable

_CLAMP_RTOL = 1e-3


# --------------------------------------------------------------------------- export


def to_comfy_sigmas(table: TimestepTable) -> list[float]:
    """ComfyUI SIGMAS values (K+1 floats, model σ space, ending in 0)."""
    table.validate()
    return [float(s) for s in table.sigmas]


def comfy_sigmas_tensor(table: TimestepTable) -> torch.Tensor:
    """ComfyUI SIGMAS as the 1-D float32 tensor its sampler nodes pass around."""
    return torch.tensor(to_comfy_sigmas(table), dtype=torch.float32)


def to_comfy_string(table: TimestepTable, digits: int = 6) -> str:
    """Comma-separated sigmas, for nodes that take a sigma list as text."""
    return ", ".join(f"{s:.{digits}g}" for s in to_comfy_sigmas(table))


# --------------------------------------------------------------------------- import


def _resolve(adapter, scheduler, convention, prediction) -> tuple[Convention, str, str | None]:
    given = [x is not None for x in (adapter, scheduler, convention)]
    if sum(given) != 1:
        raise StepsmithError("say which model the list is for: pass exactly one of adapter=, scheduler= "
                             "(a diffusers scheduler or its config) or convention= with prediction=")
    if adapter is not None:
        if prediction is not None and prediction != adapter.prediction:
            raise StepsmithError(f"prediction={prediction!r} contradicts the model's {adapter.prediction!r}")
        return adapter.convention, adapter.prediction, adapter.name
    if scheduler is not None:
        from schedules.adapters import convention_from_scheduler_config

        if isinstance(scheduler, dict):
            conv, pred = convention_from_scheduler_config(scheduler)
        else:
            from schedules.conventions import EDMConvention
            from schedules.diffusers import scheduler_convention

            conv, pred = scheduler_convention(scheduler)
            if isinstance(conv, EDMConvention):
                raise StepsmithError("EDM schedulers have no ᾱ: build the table with TimestepTable(...) directly")
        if prediction is not None and prediction != pred:
            raise StepsmithError(f"prediction={prediction!r} contradicts the scheduler's {pred!r}")
        return conv, pred, None
    if prediction is None:
        raise StepsmithError("convention= needs prediction= (flow for flow models; epsilon, v or x0 for VP)")
    return convention, prediction, None


def _clean(values: Sequence[float] | torch.Tensor, what: str) -> list[float]:
    vals = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    try:
        vals = [float(v) for v in vals]
    except (TypeError, ValueError):
        raise StepsmithError(f"{what} must be a list of numbers") from None
    if not vals:
        raise StepsmithError(f"{what} is empty")
    return vals


def _clamp_vp(conv, sigmas: list[float]) -> list[float]:
    lo, hi = conv.sigma_min, conv.sigma_max
    out = []
    for s in sigmas:
        if s == 0.0:
            out.append(s)
        elif hi < s <= hi * (1 + _CLAMP_RTOL):
            out.append(hi)
        elif lo * (1 - _CLAMP_RTOL) <= s < lo:
            out.append(lo)
        elif s > hi or s < lo:
            raise StepsmithError(
                f"sigma {s:g} lies outside this model's range [{lo:.4g}, {hi:.4g}]: the list was made for "
                "another model or another sigma space (EDM-preconditioned models such as SVD are not VP)"
            )
        else:
            out.append(s)
    return out


def table_from_sigmas(sigmas: Sequence[float] | torch.Tensor, *, adapter=None, scheduler=None,
                      convention: Convention | None = None, prediction: str | None = None, solver: str = "euler",
                      model: str | None = None, method: str = "imported", append_zero: bool | None = None,
                      provenance: dict[str, Any] | None = None) -> TimestepTable:
    """A table from a sigma list in the model's sigma space (k-diffusion / ComfyUI / AYS).

    ``append_zero=None`` appends the terminal 0 when the list does not end in 0 (diffusers'
    FlowMatch ``sigmas=`` style); ``False`` requires it.
    """
    conv, pred, name = _resolve(adapter, scheduler, convention, prediction)
    s = _clean(sigmas, "sigmas")
    if s[-1] != 0.0:
        if append_zero is False:
            raise StepsmithError("the sigma list does not end in 0; append the terminal 0 or pass append_zero=True")
        s.append(0.0)
    if conv.name == "vp":
        s = _clamp_vp(conv, s)
    elif s[0] > 1.0 + 1e-9:
        raise StepsmithError(f"flow sigmas lie in [0, 1] but the list starts at {s[0]:g}: this is a VP/EDM list")
    prov = {"imported_from": "sigmas", **(provenance or {})}
    return TimestepTable.from_sigmas(s, convention=conv, prediction=pred, solver=solver, method=method,
                                     model=model or name or "imported", provenance=prov)


def table_from_timesteps(timesteps: Sequence[float] | torch.Tensor, *, adapter=None, scheduler=None,
                         convention: Convention | None = None, prediction: str | None = None, solver: str = "euler",
                         model: str | None = None, method: str = "imported",
                         provenance: dict[str, Any] | None = None) -> TimestepTable:
    """A table from the K timesteps the network should receive (VP: discrete t; flow: σ·time_scale).

    The terminal σ = 0 is appended (no network call happens there).
    """
    conv, pred, name = _resolve(adapter, scheduler, convention, prediction)
    ts = _clean(timesteps, "timesteps")
    if any(ts[i] <= ts[i + 1] for i in range(len(ts) - 1)):
        raise StepsmithError("timesteps must be strictly decreasing (noise to data) without duplicates")
    sig = conv.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist() + [0.0]
    if conv.name == "flow" and sig[0] > 1.0 + 1e-9:
        raise StepsmithError(f"timestep {ts[0]:g} exceeds the flow model's time scale {conv.time_scale:g}")
    prov = {"imported_from": "timesteps", **(provenance or {})}
    table = TimestepTable.from_sigmas(sig, convention=conv, prediction=pred, solver=solver, method=method,
                                      model=model or name or "imported", provenance=prov)
    table.timesteps = [float(t) for t in ts]  # keep the given values exactly (no float round trip)
    table.validate()
    return table


def table_from_ays(name: str, *, solver: str = "dpmpp-2m", **model) -> TimestepTable:
    """An Align-Your-Steps list shipped by diffusers (``diffusers.schedulers.scheduling_utils.AysSchedules``).

    AYS was optimised for DPM-Solver++(2M); ``solver`` says which solver the table is for.
    """
    from diffusers.schedulers.scheduling_utils import AysSchedules

    if name not in AysSchedules:
        raise StepsmithError(f"unknown AYS list {name!r}; diffusers ships: {', '.join(AysSchedules)}")
    values = AysSchedules[name]
    prov = {"ays": name}
    if name.endswith("Timesteps"):
        return table_from_timesteps(values, solver=solver, method="ays", provenance=prov, **model)
    return table_from_sigmas(values, solver=solver, method="ays", provenance=prov, **model)
