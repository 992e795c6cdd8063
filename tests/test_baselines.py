"""Baseline schedules: validity for both conventions and all solvers, exact diffusers replay, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules.baselines import (
    BASELINES,
    ays_closed_form_nodes,
    baseline,
    distinct_descending_ints,
    loglinear_interp,
)
from schedules.io import StepsmithError
from schedules.search.toys import gaussian_adapter
from schedules.solvers import SOLVERS, sample

FLOW = gaussian_adapter("flow", 0.5, dim=2)
VP = gaussian_adapter("vp", 0.5, dim=2)


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("adapter", [FLOW, VP], ids=["flow", "vp"])
def test_every_baseline_validates(name, solver, adapter):
    for nfe in (1, 3, 4, 7, 10):
        if name == "shift" and adapter.convention.name == "vp":
            with pytest.raises(StepsmithError, match="flow"):
                baseline(adapter, name, nfe, solver)
            return
        t = baseline(adapter, name, nfe, solver)
        t.validate()
        assert t.nfe == nfe or (solver == "heun" and t.nfe == nfe + (nfe % 2 == 0) * -1)
        assert t.sigmas[-1] == 0.0 and all(a > b for a, b in zip(t.sigmas, t.sigmas[1:]))
        if adapter.convention.name == "vp":
            assert all(float(x).is_integer() and 0 <= x <= 999 for x in t.timesteps), t.timesteps
        else:
            assert 0 <= t.sigmas[0] <= 1
        x = sample(adapter, adapter.noise(4, 0), t.sigmas, solver)
        assert torch.isfinite(x).all()


def test_vp_default_and_spacings_match_diffusers():
    from diffusers import DDIMScheduler, DDPMScheduler

    for spacing in ("leading", "linspace", "trailing"):
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              timestep_spacing=spacing)
        sched.set_timesteps(6)
        assert baseline(VP, spacing, 6, "ddim").timesteps == [float(t) for t in sched.timesteps]
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ddpm.set_timesteps(5)
    assert baseline(VP, "default", 5, "ddim").timesteps == [float(t) for t in ddpm.timesteps]
    # sigmas are exactly those of the integer timesteps on this model's ᾱ
    t = baseline(VP, "default", 5, "ddim")
    ac = VP.convention.alphas_cumprod
    for s, ts in zip(t.sigmas, t.timesteps):
        assert s == pytest.approx(float(((1 - ac[int(ts)]) / ac[int(ts)]).sqrt()), rel=1e-9)


def test_flow_default_matches_flowmatch_scheduler_with_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ad = gaussian_adapter("flow", 0.5)
    ad.scheduler_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(4)
    got = baseline(ad, "default", 4, "euler").sigmas
    assert got == pytest.approx(sched.sigmas.tolist(), abs=1e-6)


def test_shift_baseline_formula():
    t = baseline(FLOW, "shift", 4, "euler", shift=3.0)
    assert t.sigmas == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_ays_closed_form_equals_formula():
    smin, smax, c, n = 0.002, 80.0, 0.5, 10
    got = ays_closed_form_nodes(smin, smax, n, c)
    want = [c * math.tan((1 - i / (n - 1)) * math.atan(smin / c) + (i / (n - 1)) * math.atan(smax / c))
            for i in range(n)][::-1]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(smax) and got[-1] == pytest.approx(smin)
    vp = baseline(VP, "ays-gaussian", 6, "euler", data_std=0.5)
    assert vp.timesteps[0] == 999.0 and vp.timesteps[-1] == 0.0


def test_karras_rho_and_published_ays():
    t7 = baseline(VP, "karras", 8, "euler")
    t1 = baseline(VP, "karras", 8, "euler", rho=1.0)
    assert t7.timesteps != t1.timesteps
    ays10 = baseline(VP, "ays-published", 10, "euler")
    assert ays10.timesteps == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    assert loglinear_interp([10.0, 1.0, 0.1], 3) == pytest.approx([10.0, 1.0, 0.1])
    assert loglinear_interp([10.0, 0.1], 3) == pytest.approx([10.0, 1.0, 0.1])


def test_unknown_and_bad_options():
    with pytest.raises(StepsmithError, match="unknown baseline"):
        baseline(FLOW, "nope", 4)
    with pytest.raises(StepsmithError, match="options"):
        baseline(FLOW, "uniform", 4, "euler", rho=3)
    with pytest.raises(StepsmithError):
        baseline(FLOW, "uniform", 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-50, 1100, allow_nan=False), min_size=1, max_size=40), st.integers(40, 1000))
def test_distinct_descending_ints(ts, T):
    r = distinct_descending_ints(ts, T)
    assert len(r) == len(ts)
    assert all(0 <= v <= T - 1 for v in r)
    assert all(a > b for a, b in zip(r, r[1:]))
