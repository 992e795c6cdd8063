"""Plug stepsmith timestep tables into diffusers pipelines and schedulers.

Two entry points::

    from schedules import pipeline_kwargs, apply_table
    image = pipe(prompt, **pipeline_kwargs(table, pipe)).images   # any pipeline
    apply_table(table, scheduler)                                  # hand-driven loops

Both refuse — before any model call — a table whose convention, prediction type or
noise schedule (ᾱ) differs from the scheduler's config, and a table whose *solver*
the scheduler cannot replay.

Which table solver runs on which scheduler
-------------------------------------------
A table is searched for one solver; replaying it with another update rule gives other
samples. The scheduler that runs the table must therefore do the same arithmetic as
:func:`schedules.solvers.sample` (verified numerically in ``tests/test_diffusers_*``).
Each supported class has one record in :mod:`schedules.diffusers.records`:

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
vp, euler/ddim            DPMSolverSinglestepScheduler       ``timesteps=`` (integers), copy with
                                                             solver_order=1 (DDIM = DPM-Solver-1)
vp, heun                  HeunDiscreteScheduler              ``timesteps=`` (integers)
vp (EDM σ), euler/ddim    EDMEulerScheduler                  ``sigmas=`` (the ramp that its
                                                             karras/exponential map sends to σ)
flow, heun                FlowMatchHeunDiscreteScheduler     installed (no custom schedule)
flow/vp, unipc            UniPCMultistepScheduler            flow: ``sigmas=`` as above; vp:
                                                             installed (no custom schedule); copy
                                                             with solver_order=2, bh2, corrector on
========================  =================================  ==================================

Where the scheduler's config would change the arithmetic (karras/exponential/beta sigma
flags, ``final_sigmas_type="sigma_min"``, thresholding, another solver order, SDE
variants, stochastic sampling) a *copy* with the neutral setting is used, and a warning
says what changed. Schedulers that cannot take a custom schedule or run another solver
(DDPM — stochastic —, DDIM, PNDM, LMS, EulerAncestral, DEIS, KDPM2, FlowMatchHeun, ...)
are replaced by the equivalent deterministic scheduler of the table's solver: flow
euler → FlowMatchEuler, vp euler/ddim → DPMSolverMultistep(order 1), vp dpmpp-2m →
DPMSolverMultistep(order 2), vp heun → HeunDiscrete, flow heun → FlowMatchHeun, EDM
euler/ddim → EDMEuler, flow/vp unipc → UniPCMultistep; ``swap=False`` raises instead, listing the supported schedulers.

Timesteps that are not integers (a VP table searched in continuous σ) cannot go through
``timesteps=`` of DPMSolverMultistep/Heun (they cast or interpolate linearly); such tables,
and pipelines whose ``__call__`` takes neither ``timesteps=`` nor ``sigmas=``
(DDPMPipeline, DDIMPipeline, community pipelines), get the table *installed*: the
pipeline's scheduler is replaced by a pinned copy whose ``set_timesteps`` always sets
exactly the table, and :func:`pipeline_kwargs` returns ``{"num_inference_steps": K}``.
:func:`remove_table` (or the :func:`plugged` context manager) restores the original.
The pinned scheduler saves (``save_pretrained``) as its diffusers base class, without
the table.

Model calls: euler/ddim/dpmpp-2m/unipc K, heun 2K-1 per batch (CFG doubles the batch, not
the calls).

Modules: :mod:`~schedules.diffusers.records` (one record per scheduler class),
:mod:`~schedules.diffusers.detect` (convention of a scheduler config, table checks),
:mod:`~schedules.diffusers.choice` (keep, reconfigure or swap the scheduler),
:mod:`~schedules.diffusers.install` (``set_timesteps`` arguments, installing, pinning),
:mod:`~schedules.diffusers.pipelines` (pipeline plumbing).
"""

from schedules.diffusers.choice import scheduler_for_table
from schedules.diffusers.detect import check_table, model_timesteps, scheduler_convention
from schedules.diffusers.install import apply_table, native_kwargs, pin_table, verify_scheduler
from schedules.diffusers.pipelines import check_model, pipeline_kwargs, pipeline_scales_input, plugged, remove_table
from schedules.diffusers.records import RECORDS, SchedulerRecord, record_for, supported_schedulers

__all__ = [
    "RECORDS", "SchedulerRecord", "apply_table", "check_model", "check_table", "model_timesteps", "native_kwargs",
    "pin_table", "pipeline_kwargs", "pipeline_scales_input", "plugged", "record_for", "remove_table",
    "scheduler_convention", "scheduler_for_table", "supported_schedulers", "verify_scheduler",
]
