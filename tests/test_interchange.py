"""Interchange: ComfyUI/k-diffusion sigma lists out, AYS / sigma / timestep lists in."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import AysSchedules

from schedules.conventions import FlowConvention, VPConvention
from schedules.interchange import (
    comfy_sigmas_tensor,
    table_from_ays,
    table_from_sigmas,
    table_from_timesteps,
    to_comfy_sigmas,
    to_comfy_string,
)
from schedules.io import StepsmithError
from schedules.table import TimestepTable, load_table

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def sd_sched():
    return EulerDiscreteScheduler(**SD)


def test_ays_sd_timesteps_and_sigmas_describe_the_same_schedule(sd_sched):
    by_t = table_from_ays("StableDiffusionTimesteps", scheduler=sd_sched)
    by_s = table_from_ays("StableDiffusionSigmas", scheduler=sd_sched)
    assert by_t.timesteps == [float(t) for t in AysSchedules["StableDiffusionTimesteps"]]
    assert by_t.steps == by_s.steps == 10 and by_t.solver == "dpmpp-2m" and by_t.method == "ays"
    # the published sigma list is the EDM sigma of the published timesteps (rounded to ~3 digits)
    for a, b in zip(by_t.sigmas[:-1], by_s.sigmas[:-1]):
        assert a == pytest.approx(b, rel=0.02)
    # σ_max 14.615 is rounded above the model's 14.6146: clamped, not refused
    assert by_s.sigmas[0] == pytest.approx(VPConvention.from_scheduler_config(SD).sigma_max)


def test_ays_sdxl_round_trips_through_json_and_comfy(sd_sched, tmp_path):
    table = table_from_ays("StableDiffusionXLSigmas", scheduler=dict(sd_sched.config), solver="euler")
    path = table.save(tmp_path / "ays.json")
    back = load_table(path)
    assert back.sigmas == table.sigmas and json.loads(path.read_text())["format"] == "stepsmith.schedule/v1"
    comfy = to_comfy_sigmas(back)
    assert comfy[-1] == 0.0 and len(comfy) == back.steps + 1
    assert torch.equal(comfy_sigmas_tensor(back), back.to_sigmas())
    assert comfy_sigmas_tensor(back).dtype == torch.float32 and comfy_sigmas_tensor(back).ndim == 1
    again = table_from_sigmas([float(v) for v in to_comfy_string(back, digits=12).split(",")], scheduler=sd_sched)
    assert again.sigmas == pytest.approx(back.sigmas, rel=1e-10)


def test_user_flow_sigmas_without_terminal_zero_get_it():
    table = table_from_sigmas([1.0, 0.7, 0.4, 0.1], convention=FlowConvention(1000.0), prediction="flow")
    assert table.sigmas == [1.0, 0.7, 0.4, 0.1, 0.0] and table.timesteps == pytest.approx([1000, 700, 400, 100])
    with pytest.raises(StepsmithError, match="end in 0"):
        table_from_sigmas([1.0, 0.5], convention=FlowConvention(1000.0), prediction="flow", append_zero=False)


def test_user_timesteps_for_a_flow_scheduler():
    table = table_from_timesteps([1000, 750, 500, 250], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 model="sd3")
    assert table.convention == "flow" and table.prediction == "flow" and table.sigmas == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_user_vp_timesteps_keep_their_values(sd_sched):
    table = table_from_timesteps([999, 700.5, 400, 10], scheduler=sd_sched, solver="ddim")
    assert table.timesteps == [999.0, 700.5, 400.0, 10.0]
    conv = VPConvention.from_scheduler_config(SD)
    assert table.sigmas[1] == pytest.approx(float(conv.sigma_from_model_time(torch.tensor(700.5))))
    assert table.nfe == 4


@pytest.mark.parametrize("call,match", [
    (lambda s: table_from_sigmas([700.0, 30.0, 0.0], scheduler=s), "outside this model's range"),  # SVD/EDM list
    (lambda s: table_from_ays("StableDiffusionVideoSigmas", scheduler=s), "outside this model's range"),
    (lambda s: table_from_ays("NoSuchList", scheduler=s), "diffusers ships"),
    (lambda s: table_from_timesteps([999, 500, 500], scheduler=s), "strictly decreasing"),
    (lambda _s: table_from_timesteps([999, 500], convention=FlowConvention(1000.0), prediction="flow"), None),
    (lambda _s: table_from_timesteps([1200, 500], convention=FlowConvention(1000.0), prediction="flow"), "time scale"),
    (lambda _s: table_from_sigmas([1.0, 0.5, 0.0]), "exactly one of"),
    (lambda _s: table_from_sigmas([5.0, 0.5, 0.0], convention=FlowConvention(1000.0), prediction="flow"), "VP/EDM"),
    (lambda s: table_from_sigmas([5.0, 0.5, 0.0], scheduler=s, prediction="v"), "contradicts"),
    (lambda s: table_from_sigmas(["a", 0.0], scheduler=s), "list of numbers"),
])
def test_bad_imports_explain_themselves(sd_sched, call, match):
    if match is None:
        assert isinstance(call(sd_sched), TimestepTable)
        return
    with pytest.raises(StepsmithError, match=match):
        call(sd_sched)
