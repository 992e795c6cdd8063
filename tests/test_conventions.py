import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules import conventions as C
from schedules.io import StepsmithError

unit = st.floats(min_value=1e-4, max_value=1 - 1e-4)


@given(unit)
def test_flow_rf_round_trip_and_direction(s):
    t = C.flow_to_rf(s)
    assert C.rf_to_flow(t) == pytest.approx(s)
    # rectified flow runs the other way: more noise = smaller t
    assert C.flow_to_rf(min(1.0, s + 1e-3)) < t


@given(unit)
def test_flow_edm_round_trip(s):
    assert C.edm_to_flow(C.flow_to_edm(s)) == pytest.approx(s, rel=1e-9)


@given(st.floats(min_value=1e-3, max_value=200.0))
def test_edm_logsnr_alphas_round_trip(s):
    assert C.logsnr_to_edm(C.edm_to_logsnr(s)) == pytest.approx(s, rel=1e-9)
    ac = C.edm_to_alphas_cumprod(s)
    assert C.alphas_cumprod_to_edm(ac) == pytest.approx(s, rel=1e-9)


@given(unit, st.floats(min_value=0.2, max_value=8.0))
def test_shift_inverse(s, shift):
    assert C.inverse_shift(C.apply_shift(s, shift), shift) == pytest.approx(s, rel=1e-9)
    if shift > 1:
        assert C.apply_shift(s, shift) > s  # shift > 1 spends more steps at high noise


def test_shift_matches_reference_numbers():
    # SD3's time shift (Esser et al. 2024): shift=3 turns [1, .75, .5, .25] into [1, .9, .75, .5]
    got = [C.apply_shift(s, 3.0) for s in (1.0, 0.75, 0.5, 0.25)]
    assert got == pytest.approx([1.0, 0.9, 0.75, 0.5])


def test_vp_matches_diffusers_and_sd_sigma_min():
    from diffusers import DDPMScheduler

    cfg = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    conv = C.VPConvention.from_scheduler_config(cfg)
    ac = DDPMScheduler(**cfg).alphas_cumprod.double()
    assert torch.allclose(conv.alphas_cumprod, ac)
    # σ(t=0) = 0.0292 for SD's scaled_linear betas (the σ_min k-diffusion reports for SD1.5)
    assert conv.sigma_min == pytest.approx(0.0292, abs=1e-4)


@given(st.floats(min_value=0.0, max_value=999.0))
@settings(max_examples=50)
def test_vp_timestep_round_trip(t):
    conv = C.VPConvention.default()
    s = conv.sigma_from_model_time(torch.tensor([t], dtype=torch.float64))
    assert conv.model_time(s).item() == pytest.approx(t, abs=1e-6)


def test_vp_sigma_is_increasing_in_t_and_alpha_sigma_consistent():
    conv = C.VPConvention.default()
    s = conv.discrete_sigmas
    assert torch.all(s[1:] > s[:-1])
    a, st_ = conv.alpha(s), conv.sigma_t(s)
    assert torch.allclose(a**2 + st_**2, torch.ones_like(s))
    assert torch.allclose(a**2, conv.alphas_cumprod)


def test_vp_refuses_out_of_range_and_terminal():
    conv = C.VPConvention.default()
    with pytest.raises(StepsmithError, match="range"):
        conv.model_time(torch.tensor([conv.sigma_max * 2]))
    with pytest.raises(StepsmithError, match="terminal"):
        conv.model_time(torch.tensor([0.0]))


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_vp_prediction_round_trip(prediction):
    conv = C.VPConvention.default()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    s = conv.discrete_sigmas[torch.randint(0, 1000, (8,), generator=g)].float()[:, None]
    x = conv.alpha(s) * x0 + conv.sigma_t(s) * eps
    target = C.x0_to_prediction(conv, prediction, x0, eps, s)
    assert torch.allclose(C.prediction_to_x0(conv, prediction, x, s, target), x0, atol=1e-4)


def test_flow_prediction_round_trip():
    conv = C.FlowConvention()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    s = torch.rand(8, 1, generator=g)
    x = (1 - s) * x0 + s * eps
    v = C.x0_to_prediction(conv, "flow", x0, eps, s)
    assert torch.allclose(v, eps - x0)
    assert torch.allclose(C.prediction_to_x0(conv, "flow", x, s, v), x0, atol=1e-6)


def test_logsnr_values():
    assert C.flow_to_logsnr(0.5) == pytest.approx(0.0)
    assert C.edm_to_logsnr(math.e) == pytest.approx(-2.0)
