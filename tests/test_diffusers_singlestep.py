"""DPMSolverSinglestepScheduler, supported by one record: order 1 is DDIM, so it replays
euler/ddim tables exactly — through ``timesteps=`` for integral timesteps, installed
otherwise — while its order-2/3 single-step updates are not our dpmpp-2m (swapped)."""

from __future__ import annotations

import diffusers
import pytest
import torch

from schedules.adapters import ModelAdapter
from schedules.conventions import VPConvention
from schedules.diffusers import apply_table, model_timesteps, pipeline_kwargs, remove_table, scheduler_for_table
from schedules.io import StepsmithError
from schedules.pipeline import UnconditionalFlowMatchPipeline
from schedules.solvers import sample
from tests.test_diffusers_schedulers import VP, VP_CFG, GaussianNet, drive, ours, vp_table
from tests.test_pipeline_flow import tiny_unet

torch.set_num_threads(1)

FRACTIONAL = (999.0, 700.25, 420.5, 150.75, 20.5)


@pytest.mark.parametrize("solver,ts", [("ddim", (999.0, 751.0, 480.0, 233.0, 61.0)), ("euler", FRACTIONAL)])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_singlestep_replays_table_like_our_solver(solver, ts, prediction):
    table = vp_table(solver, ts=ts, prediction=prediction)
    pt = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    sched = apply_table(table, diffusers.DPMSolverSinglestepScheduler(**VP_CFG, prediction_type=pt), swap=True)
    assert type(sched).__name__ == "DPMSolverSinglestepScheduler" and sched.config.solver_order == 1
    net = GaussianNet(VP, table.prediction)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    got = drive(sched, net, x)
    assert len(net.timesteps) == table.nfe
    assert net.timesteps == pytest.approx(model_timesteps(table, sched), abs=2e-3)
    torch.testing.assert_close(got, ours(table, VP, x), atol=2e-4, rtol=2e-4)


def test_singlestep_order_one_is_kept_and_order_two_is_refused_without_swap():
    table = vp_table("ddim")
    neutral = diffusers.DPMSolverSinglestepScheduler(**VP_CFG, solver_order=1, lower_order_final=True)
    assert scheduler_for_table(table, neutral, swap=False) == (neutral, None)
    with pytest.raises(StepsmithError, match="solver_order=2"):
        apply_table(table, diffusers.DPMSolverSinglestepScheduler(**VP_CFG))


def test_singlestep_dpmpp_2m_table_swaps_to_the_multistep_scheduler():
    sch, msg = scheduler_for_table(vp_table("dpmpp-2m"), diffusers.DPMSolverSinglestepScheduler(**VP_CFG))
    assert type(sch).__name__ == "DPMSolverMultistepScheduler" and sch.config.solver_order == 2
    assert "DPMSolverSinglestepScheduler" in msg


def test_singlestep_on_a_pipeline_passes_integer_timesteps_and_matches_our_solver():
    sch = diffusers.DPMSolverSinglestepScheduler(**VP_CFG)
    pipe = UnconditionalFlowMatchPipeline(tiny_unet(1), sch)  # any pipeline taking timesteps= works
    table = vp_table("ddim", ts=(999.0, 731.0, 402.0, 150.0, 33.0))
    try:
        kw = pipeline_kwargs(table, pipe)
        assert kw == {"timesteps": [999, 731, 402, 150, 33]}
        assert type(pipe.scheduler).__name__ == "DPMSolverSinglestepScheduler" and pipe.scheduler.config.solver_order == 1
        noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        out = pipe(batch_size=2, latents=noise, output_type="latent", **kw).images
    finally:
        remove_table(pipe)
    assert pipe.scheduler is sch
    conv = VPConvention.from_scheduler_config(VP_CFG)
    adapter = ModelAdapter(module=pipe.unet, convention=conv, prediction="epsilon", sample_shape=(1, 8, 8), name="tiny")
    torch.testing.assert_close(out, sample(adapter, noise, table.sigmas, "ddim"), atol=1e-4, rtol=1e-4)
