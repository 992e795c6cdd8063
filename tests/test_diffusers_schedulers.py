"""Numerical proof: a diffusers scheduler driven with a plugged table gives the same samples
as stepsmith's own solver on that table (exact Gaussian denoiser, so differences are solver
arithmetic only), and it evaluates the network at exactly the table's timesteps."""

from __future__ import annotations

import logging

import diffusers
import pytest
import torch

from schedules.analytic import GaussianDenoiser
from schedules.conventions import FlowConvention, VPConvention, x0_to_prediction
from schedules.diffusers import apply_table, model_timesteps, pin_table, scheduler_for_table
from schedules.io import StepsmithError
from schedules.solvers import sample
from schedules.table import TimestepTable

torch.set_num_threads(1)

VP_CFG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
VP = VPConvention.from_scheduler_config(VP_CFG)
FLOW = FlowConvention(1000.0)
PRED = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def flow_table(solver="euler", sigmas=(1.0, 0.83, 0.6, 0.37, 0.15, 0.0)):
    return TimestepTable.from_sigmas(list(sigmas), convention=FLOW, prediction="flow", solver=solver, method="test",
                                     model="test")


def vp_table(solver="euler", ts=(999.0, 751.0, 480.0, 233.0, 61.0), prediction="epsilon"):
    sig = VP.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist() + [0.0]
    return TimestepTable.from_sigmas(sig, convention=VP, prediction=prediction, solver=solver, method="test", model="test")


class GaussianNet:
    """A 'network' with diffusers' interface whose denoiser is exact for Gaussian data."""

    def __init__(self, conv, prediction):
        self.conv, self.prediction = conv, prediction
        self.gauss = GaussianDenoiser(conv, data_std=0.5, mean=0.3)
        self.timesteps: list[float] = []

    def __call__(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        self.timesteps.append(float(t[0]))
        s = self.conv.sigma_from_model_time(t).to(torch.float64).expand(x.shape[0])
        x0 = self.gauss.denoise(x.double(), s).double()
        sb = s.view(-1, *([1] * (x.ndim - 1)))
        eps = (x.double() - self.conv.alpha(sb) * x0) / self.conv.sigma_t(sb)
        return x0_to_prediction(self.conv, self.prediction, x0, eps, sb).float()


def drive(scheduler, net, x_start):
    """The standard diffusers loop. ``x_start`` is the state in the model's convention."""
    s0 = float(scheduler.sigmas[0])
    holds_y = type(scheduler).__name__ in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "EDMEulerScheduler")
    lat = x_start * (1 + s0**2) ** 0.5 if holds_y else x_start.clone()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(lat, t) if hasattr(scheduler, "scale_model_input") else lat
        lat = scheduler.step(net(inp, t), t, lat, return_dict=False)[0]
    return lat


def ours(table, conv, x_start):
    return sample(GaussianDenoiser(conv, data_std=0.5, mean=0.3), x_start.double(), table.sigmas, table.solver).float()


CASES = [
    # (id, table factory, scheduler factory, swap)
    ("flowmatch-shift3", lambda: flow_table(), lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), False),
    ("flowmatch-dynamic", lambda: flow_table(),
     lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), True),
    ("unipc-flow", lambda: flow_table(),
     lambda: diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=2.0, prediction_type="flow_prediction"),
     True),
    ("unipc-flow-native", lambda: flow_table(sigmas=(0.999, 0.8, 0.55, 0.3, 0.1, 0.0)),
     lambda: diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction"),
     True),
    ("euler-vp-fractional", lambda: vp_table(ts=(999.0, 700.25, 420.5, 150.75, 20.5)),
     lambda: diffusers.EulerDiscreteScheduler(**VP_CFG, timestep_spacing="leading"), False),
    ("dpm1-ddim-int", lambda: vp_table("ddim"), lambda: diffusers.DPMSolverMultistepScheduler(**VP_CFG), True),
    ("dpm1-ddim-fractional", lambda: vp_table("ddim", ts=(999.0, 700.25, 420.5, 150.75, 20.5)),
     lambda: diffusers.DPMSolverMultistepScheduler(**VP_CFG, solver_order=1), False),
    ("dpm2m-int", lambda: vp_table("dpmpp-2m"), lambda: diffusers.DPMSolverMultistepScheduler(**VP_CFG), False),
    ("dpm2m-fractional-v", lambda: vp_table("dpmpp-2m", ts=(998.5, 700.25, 420.5, 150.75, 20.5), prediction="v"),
     lambda: diffusers.DPMSolverMultistepScheduler(**VP_CFG, prediction_type="v_prediction"), False),
    ("heun-int", lambda: vp_table("heun"), lambda: diffusers.HeunDiscreteScheduler(**VP_CFG), True),
    ("heun-fractional", lambda: vp_table("heun", ts=(999.0, 700.25, 420.5, 150.75, 20.5)),
     lambda: diffusers.HeunDiscreteScheduler(**VP_CFG, clip_sample=False, timestep_spacing="leading"), False),
    ("ddpm-swapped", lambda: vp_table("euler"), lambda: diffusers.DDPMScheduler(**VP_CFG), True),
    ("ddim-swapped", lambda: vp_table("ddim"), lambda: diffusers.DDIMScheduler(**VP_CFG), True),
    ("flowheun-swapped", lambda: flow_table("heun"), lambda: diffusers.FlowMatchEulerDiscreteScheduler(), True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scheduler_replays_table_like_our_solver(case):
    _, make_table, make_sched, swap = case
    table = make_table()
    sched = apply_table(table, make_sched(), swap=swap)
    conv = FLOW if table.convention == "flow" else VP
    net = GaussianNet(conv, table.prediction)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    got = drive(sched, net, x)
    want = ours(table, conv, x)
    assert len(net.timesteps) == table.nfe
    assert net.timesteps == pytest.approx(model_timesteps(table, sched), abs=2e-3)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    # and the solvers really differ: the same schedule with another solver gives other samples
    other = "dpmpp-2m" if table.solver in ("euler", "ddim", "heun") else "euler"
    assert (ours(TimestepTable.from_sigmas(table.sigmas, convention=conv, prediction=table.prediction, solver=other,
                                           method="t", model="t"), conv, x) - want).abs().max() > 1e-3


def test_pinned_scheduler_ignores_step_count_and_mu_but_refuses_other_counts():
    table = flow_table()
    pinned = pin_table(table, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
    pinned.set_timesteps(table.steps, mu=2.0)
    assert pinned.timesteps.tolist() == pytest.approx(model_timesteps(table, pinned), abs=1e-3)
    with pytest.raises(StepsmithError, match="num_inference_steps=5"):
        pinned.set_timesteps(7)


def test_flowmatch_shift_is_compensated_not_applied():
    table = flow_table()
    sch = apply_table(table, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert sch.sigmas.tolist() == pytest.approx(table.sigmas, abs=1e-6)
    # without compensation the shift would have moved them
    raw = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    raw.set_timesteps(sigmas=table.sigmas[:-1])
    assert abs(float(raw.sigmas[1]) - table.sigmas[1]) > 0.05


def test_edm_euler_takes_exact_sigmas():
    sigs = [80.0, 20.0, 4.0, 0.9, 0.1, 0.0]
    table = TimestepTable(sigmas=sigs, timesteps=[5.0, 4.0, 3.0, 2.0, 1.0], solver="euler", prediction="epsilon",
                          convention="vp", method="t", model="edm")
    for schedule in ("karras", "exponential"):
        sch = apply_table(table, diffusers.EDMEulerScheduler(sigma_schedule=schedule))
        assert sch.sigmas.tolist() == pytest.approx(sigs, rel=1e-5)


@pytest.mark.parametrize("make,match", [
    (lambda: diffusers.FlowMatchEulerDiscreteScheduler(), "vp model but"),
    (lambda: diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
     "another VP noise schedule"),
    (lambda: diffusers.EulerDiscreteScheduler(**VP_CFG, prediction_type="v_prediction"), "predicts v"),
])
def test_incompatible_scheduler_is_refused(make, match):
    with pytest.raises(StepsmithError, match=match):
        apply_table(vp_table(), make())


def test_solver_mismatch_refused_without_swap_and_announced_with_swap(caplog):
    with pytest.raises(StepsmithError, match="HeunDiscreteScheduler"):
        apply_table(vp_table("heun"), diffusers.EulerDiscreteScheduler(**VP_CFG))
    with pytest.raises(StepsmithError, match="supported|use one of"):
        apply_table(vp_table("euler"), diffusers.PNDMScheduler(**VP_CFG))
    with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
        sch, msg = scheduler_for_table(vp_table("euler"), diffusers.LMSDiscreteScheduler(**VP_CFG))
    assert type(sch).__name__ == "DPMSolverMultistepScheduler" and sch.config.solver_order == 1
    assert "LMSDiscreteScheduler" in msg and "swapped" in caplog.text


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_edm_euler_replays_our_euler(schedule):
    """EDMEuler (EDM-preconditioned models): Euler in EDM σ, the same arithmetic as our VP euler."""
    sigs = [60.0, 20.0, 4.0, 0.9, 0.1, 0.0]
    table = TimestepTable(sigmas=sigs, timesteps=[5.0, 4.0, 3.0, 2.0, 1.0], solver="euler", prediction="epsilon",
                          convention="vp", method="t", model="edm")
    sch = apply_table(table, diffusers.EDMEulerScheduler(sigma_schedule=schedule, prediction_type="epsilon"))
    gauss = GaussianDenoiser(VP, data_std=0.5, mean=0.3)
    sd = sch.config.sigma_data
    seen = []

    def net(inp, c_noise):  # the network output that EDM preconditioning turns into the exact x0
        sigma = float(torch.exp(4 * torch.as_tensor(c_noise, dtype=torch.float64)))
        seen.append(sigma)
        y = inp.double() * (sigma**2 + sd**2) ** 0.5
        x0 = gauss.denoise(y / (1 + sigma**2) ** 0.5, torch.full((y.shape[0],), sigma, dtype=torch.float64)).double()
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2) ** 0.5
        return ((x0 - c_skip * y) / c_out).float()

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    got = drive(sch, net, x) / 1.0  # EDMEuler ends in the data space (σ=0: y = x)
    assert seen == pytest.approx(sigs[:-1], rel=1e-5)
    torch.testing.assert_close(got, ours(table, VP, x), atol=2e-4, rtol=2e-4)


def test_edm_multistep_scheduler_swaps_to_edm_euler_never_to_a_vp_scheduler():
    table = TimestepTable(sigmas=[60.0, 4.0, 0.5, 0.0], timesteps=[3.0, 2.0, 1.0], solver="ddim", prediction="epsilon",
                          convention="vp", method="t", model="edm")
    sch, msg = scheduler_for_table(table, diffusers.EDMDPMSolverMultistepScheduler())
    assert type(sch).__name__ == "EDMEulerScheduler" and "EDMDPMSolverMultistepScheduler" in msg
    with pytest.raises(StepsmithError, match="no diffusers scheduler"):
        scheduler_for_table(TimestepTable(**{**table.to_dict(), "solver": "dpmpp-2m", "nfe": 3}),
                            diffusers.EDMDPMSolverMultistepScheduler())


@pytest.mark.parametrize("cls", [diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler])
def test_initial_noise_scale_matches_our_solver_start(cls):
    # with trailing spacing diffusers would scale the start by σ0 instead of sqrt(σ0²+1)
    table = vp_table("heun" if cls is diffusers.HeunDiscreteScheduler else "euler")
    extra = {"clip_sample": False} if cls is diffusers.HeunDiscreteScheduler else {}
    with pytest.raises(StepsmithError, match="timestep_spacing"):
        apply_table(table, cls(**VP_CFG, timestep_spacing="trailing", **extra))
    sch = apply_table(table, cls(**VP_CFG, timestep_spacing="trailing"), swap=True)
    assert float(sch.init_noise_sigma) == pytest.approx((table.sigmas[0] ** 2 + 1) ** 0.5, rel=1e-6)


def test_edm_scheduler_describes_an_edm_convention():
    from schedules.conventions import EDMConvention
    from schedules.diffusers import scheduler_convention

    sch = diffusers.EDMEulerScheduler(sigma_min=0.01, sigma_max=50.0, sigma_data=0.6, prediction_type="v_prediction")
    conv, pred = scheduler_convention(sch)
    assert isinstance(conv, EDMConvention) and pred == "v"
    assert (conv.sigma_min, conv.sigma_max, conv.sigma_data) == (0.01, 50.0, 0.6)
    s = torch.tensor([50.0, 3.0, 0.02], dtype=torch.float64)
    torch.testing.assert_close(conv.model_time(s), sch.precondition_noise(s))  # the network's c_noise
    torch.testing.assert_close(conv.sigma_from_model_time(conv.model_time(s)), s)
    assert conv.alpha(s).tolist() == [1.0] * 3 and conv.sigma_t(s) is s  # x = x0 + σ·ε
    assert conv.check_sigmas([80.0, 1.0, 0.0]) is not None and conv.check_sigmas([40.0, 1.0, 0.0]) is None


def test_every_record_names_a_diffusers_class_and_its_config_keys():
    import inspect

    from schedules.diffusers import RECORDS, record_for

    for table in (flow_table(), vp_table()):
        for rec in RECORDS:
            params = set(inspect.signature(rec.cls.__init__).parameters)
            assert set(rec.neutral(table)) <= params, rec.name
            assert rec.solvers and rec.entries and set(rec.replaces) <= set(rec.solvers)
    # subclasses (and pinned copies) resolve to their diffusers base class's record
    sub = type("MyEuler", (diffusers.EulerDiscreteScheduler,), {})
    assert record_for(sub(**VP_CFG)).name == "EulerDiscreteScheduler"
    assert record_for(pin_table(flow_table(), diffusers.FlowMatchEulerDiscreteScheduler())).name == \
        "FlowMatchEulerDiscreteScheduler"
    assert record_for(diffusers.DDPMScheduler(**VP_CFG)) is None
