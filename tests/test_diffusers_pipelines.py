"""Proof on the real diffusers pipeline classes: StableDiffusion, StableDiffusionXL,
StableDiffusion3 and Flux, built offline with tiny random weights (tokenizer vocabularies
are written to a temporary folder). For each, a plugged table must reach the denoiser
exactly — hooked timesteps equal the table's, one call per NFE (CFG doubles the batch,
not the calls) — and bad tables must fail before the first denoiser call.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from schedules.conventions import FlowConvention, VPConvention
from schedules.diffusers import model_timesteps, pipeline_kwargs, remove_table
from schedules.io import StepsmithError
from schedules.table import TimestepTable
from tests.tiny_pipelines import SD_SCHED

torch.set_num_threads(1)


# ------------------------------------------------------------------ recording the denoiser


class Recorder:
    """Forward pre-hook: the timestep every denoiser call received, and its batch size."""

    def __init__(self, module, scale=1.0):
        self.values: list[float] = []
        self.batches: list[int] = []
        self.scale = scale
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = torch.as_tensor(t).reshape(-1).to(torch.float64)
        assert torch.all(t == t[0])
        self.values.append(float(t[0]) * self.scale)
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        self.batches.append(int(x.shape[0]))


def run(pipe, denoiser, kwargs, scale=1.0, **call):
    rec = Recorder(denoiser, scale)
    try:
        pipe("a cat", height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0), **call,
             **kwargs)
    finally:
        rec.handle.remove()
    return rec


def vp_table(ts, solver="euler", cfg=SD_SCHED, prediction="epsilon"):
    conv = VPConvention.from_scheduler_config(cfg)
    sig = conv.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist() + [0.0]
    return TimestepTable.from_sigmas(sig, convention=conv, prediction=prediction, solver=solver, method="test",
                                     model="tiny-sd")


def flow_table(sigmas=(1.0, 0.86, 0.62, 0.33, 0.1, 0.0), solver="euler"):
    return TimestepTable.from_sigmas(list(sigmas), convention=FlowConvention(1000.0), prediction="flow", solver=solver,
                                     method="test", model="tiny-flow")


def check(rec, table, sched, batch):
    assert len(rec.values) == table.nfe, f"{len(rec.values)} denoiser calls for a table of NFE {table.nfe}"
    assert rec.values == pytest.approx(model_timesteps(table, sched), abs=2e-3)
    assert set(rec.batches) == {batch}


# ------------------------------------------------------------------ SD 1.5


@pytest.mark.parametrize("solver,ts", [("euler", (999.0, 734.5, 402.0, 151.25, 21.0)), ("ddim", (999.0, 601.0, 201.0, 11.0)),
                                       ("dpmpp-2m", (981.0, 700.0, 400.0, 100.0)), ("heun", (961.0, 500.0, 50.0))])
def test_sd_pipeline_with_cfg(sd_pipe, solver, ts, caplog):
    table = vp_table(ts, solver)
    with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
        kw = pipeline_kwargs(table, sd_pipe)
    try:
        assert "PNDMScheduler" in caplog.text  # PNDM takes no custom schedule: swapped, and said so
        rec = run(sd_pipe, sd_pipe.unet, kw, guidance_scale=5.0, num_images_per_prompt=2)
        check(rec, table, sd_pipe.scheduler, batch=4)  # CFG doubles the batch (2 images × 2), not the calls
    finally:
        remove_table(sd_pipe)
    assert type(sd_pipe.scheduler).__name__ == "PNDMScheduler"


def test_sd_pipeline_keeps_a_capable_scheduler_and_uses_timesteps(sd_pipe):
    orig = sd_pipe.scheduler
    sd_pipe.scheduler = DPMSolverMultistepScheduler(**SD_SCHED, solver_order=1)
    try:
        table = vp_table((999.0, 500.0, 100.0), "ddim")
        kw = pipeline_kwargs(table, sd_pipe)
        assert kw == {"timesteps": [999, 500, 100]}
        check(run(sd_pipe, sd_pipe.unet, kw, guidance_scale=1.0), table, sd_pipe.scheduler, batch=1)
    finally:
        sd_pipe.scheduler = orig


# ------------------------------------------------------------------ SDXL


@pytest.mark.parametrize("solver,ts", [("euler", (999.0, 734.5, 402.0, 151.25, 21.0)), ("heun", (999.0, 500.0, 50.0))])
def test_sdxl_pipeline(sdxl_pipe, solver, ts):
    table = vp_table(ts, solver)
    kw = pipeline_kwargs(table, sdxl_pipe)
    try:
        if solver == "euler":
            assert set(kw) == {"sigmas"} and type(sdxl_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        check(run(sdxl_pipe, sdxl_pipe.unet, kw, guidance_scale=3.0), table, sdxl_pipe.scheduler, batch=2)
    finally:
        remove_table(sdxl_pipe)


def test_sdxl_with_ays_timesteps_from_diffusers(sdxl_pipe):
    from diffusers.schedulers.scheduling_utils import AysSchedules

    from schedules.interchange import table_from_timesteps

    table = table_from_timesteps(AysSchedules["StableDiffusionXLTimesteps"], scheduler=sdxl_pipe.scheduler,
                                 solver="dpmpp-2m", model="ays-sdxl")
    kw = pipeline_kwargs(table, sdxl_pipe)
    try:
        check(run(sdxl_pipe, sdxl_pipe.unet, kw, guidance_scale=1.0), table, sdxl_pipe.scheduler, batch=1)
        assert model_timesteps(table, sdxl_pipe.scheduler) == list(map(float, AysSchedules["StableDiffusionXLTimesteps"]))
    finally:
        remove_table(sdxl_pipe)


# ------------------------------------------------------------------ SD3 and Flux (flow matching)


def test_sd3_pipeline_shift_compensated(sd3_pipe):
    table = flow_table()
    kw = pipeline_kwargs(table, sd3_pipe)
    assert set(kw) == {"sigmas"} and sd3_pipe.scheduler.config.shift == 3.0
    check(run(sd3_pipe, sd3_pipe.transformer, kw, guidance_scale=4.0), table, sd3_pipe.scheduler, batch=2)


def test_flux_pipeline_dynamic_shift_disabled(flux_pipe, caplog):
    table = flow_table()
    with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
        kw = pipeline_kwargs(table, flux_pipe)
    try:
        assert "use_dynamic_shifting=False" in caplog.text
        # Flux passes timestep/1000 (= σ) to its transformer
        check(run(flux_pipe, flux_pipe.transformer, kw, scale=1000.0, guidance_scale=1.0, num_images_per_prompt=2),
              table, flux_pipe.scheduler, batch=2)
    finally:
        remove_table(flux_pipe)
    assert flux_pipe.scheduler.config.use_dynamic_shifting


# ------------------------------------------------------------------ bad input, before any denoiser call


@pytest.mark.parametrize("which,make,match", [
    ("sd", lambda: flow_table(), "flow model but"),
    ("sd", lambda: vp_table((999.0, 500.0), cfg=dict(SD_SCHED, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
     "another VP noise schedule"),
    ("sd", lambda: vp_table((999.0, 500.0), prediction="v"), "v-prediction"),
    ("sd3", lambda: vp_table((999.0, 500.0)), "vp model but"),
    ("flux", lambda: flow_table(solver="dpmpp-2m"), "no diffusers scheduler"),
])
def test_bad_tables_fail_before_the_first_call(request, which, make, match):
    pipe = request.getfixturevalue(f"{which}_pipe")
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    before = pipe.scheduler
    rec = Recorder(denoiser)
    try:
        with pytest.raises(StepsmithError, match=match):
            pipe("a cat", height=16, width=16, output_type="latent", **pipeline_kwargs(make(), pipe))
    finally:
        rec.handle.remove()
    assert rec.values == [] and pipe.scheduler is before


def test_unsupported_scheduler_is_refused_with_the_list(sd_pipe):
    orig = sd_pipe.scheduler
    sd_pipe.scheduler = DDIMScheduler(**SD_SCHED)
    try:
        with pytest.raises(StepsmithError, match="FlowMatchEulerDiscreteScheduler.*EulerDiscreteScheduler"):
            pipeline_kwargs(vp_table((999.0, 500.0)), sd_pipe, swap=False)
        with pytest.raises(StepsmithError, match="HeunDiscreteScheduler"):
            sd_pipe.scheduler = EulerDiscreteScheduler(**SD_SCHED)
            pipeline_kwargs(vp_table((999.0, 500.0), "heun"), sd_pipe, swap=False)
    finally:
        sd_pipe.scheduler = orig


def test_heun_scheduler_counts_2k_minus_1(sd_pipe):
    orig = sd_pipe.scheduler
    sd_pipe.scheduler = HeunDiscreteScheduler(**SD_SCHED)
    try:
        table = vp_table((999.0, 700.0, 300.0, 30.0), "heun")
        kw = pipeline_kwargs(table, sd_pipe)
        assert kw == {"timesteps": [999, 700, 300, 30]}
        rec = run(sd_pipe, sd_pipe.unet, kw, guidance_scale=1.0)
        assert len(rec.values) == 2 * table.steps - 1 == table.nfe
    finally:
        sd_pipe.scheduler = orig


def test_pipeline_kwargs_warns_when_the_call_setting_differs_from_the_table(sd_pipe):
    import dataclasses
    import warnings

    table = dataclasses.replace(vp_table((999.0, 601.0, 201.0, 11.0), solver="ddim"),
                                conditioning={"kind": "prompt", "guidance": 7.5, "height": 16, "width": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kw = pipeline_kwargs(table, sd_pipe, guidance_scale=7.5, height=16)
    assert kw["guidance_scale"] == 7.5 and kw["height"] == 16 and "timesteps" in kw
    with pytest.warns(UserWarning, match=r"guidance_scale 3 \(table: 7.5\).*width 32 \(table: 16\)"):
        kw = pipeline_kwargs(table, sd_pipe, guidance_scale=3.0, width=32)
    assert kw["guidance_scale"] == 3.0 and kw["width"] == 32
    remove_table(sd_pipe)
