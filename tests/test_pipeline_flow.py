"""UnconditionalFlowMatchPipeline and DDPMPipeline/DDIMPipeline with plugged tables.

Tiny random UNets built from ``digits_unet_config`` (the embedded digits folders are used
when present). Every run hooks the UNet's forward and checks the timesteps it received and
the number of calls; sampling results are compared with stepsmith's own solver.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from schedules.adapters import ModelAdapter
from schedules.conventions import FlowConvention, VPConvention
from schedules.diffusers import model_timesteps, pipeline_kwargs, plugged, remove_table
from schedules.embedded import embedded_path
from schedules.embedded.nets import digits_unet_config
from schedules.io import StepsmithError
from schedules.pipeline import UnconditionalFlowMatchPipeline
from schedules.solvers import sample
from schedules.table import TimestepTable

torch.set_num_threads(1)

DDPM_CFG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                prediction_type="epsilon", clip_sample=False)


def tiny_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    cfg = digits_unet_config()
    cfg.update(block_out_channels=(8, 16), norm_num_groups=4, sample_size=8)
    return UNet2DModel(**cfg).eval()


class Recorder:
    """Forward pre-hook recording the timestep each call received (positional or keyword)."""

    def __init__(self, module, key="timestep", pos=1):
        self.values: list[float] = []
        self.batches: list[int] = []
        self.key, self.pos = key, pos
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        t = kwargs[self.key] if self.key in kwargs else args[self.pos]
        t = torch.as_tensor(t).reshape(-1)
        assert torch.all(t == t[0]), "every sample in a call must get the same timestep"
        self.values.append(float(t[0]))
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        self.batches.append(int(x.shape[0]))

    def reset(self):
        self.values.clear()
        self.batches.clear()


@pytest.fixture(scope="module")
def flow_pipe():
    return UnconditionalFlowMatchPipeline(tiny_unet(0), FlowMatchEulerDiscreteScheduler(shift=3.0))


@pytest.fixture(scope="module")
def ddpm_pipe():
    return DDPMPipeline(tiny_unet(1), DDPMScheduler(**DDPM_CFG))


def flow_table(sigmas=(1.0, 0.81, 0.55, 0.32, 0.12, 0.0), solver="euler", model="test"):
    return TimestepTable.from_sigmas(list(sigmas), convention=FlowConvention(1000.0), prediction="flow",
                                     solver=solver, method="test", model=model)


def vp_table(ts=(999.0, 731.5, 402.25, 150.0, 33.0), solver="ddim", cfg=DDPM_CFG, prediction="epsilon"):
    conv = VPConvention.from_scheduler_config(cfg)
    sig = conv.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist() + [0.0]
    return TimestepTable.from_sigmas(sig, convention=conv, prediction=prediction, solver=solver, method="test",
                                     model="test")


# ------------------------------------------------------------------ own flow pipeline


def test_flow_pipeline_runs_exactly_the_table_and_matches_our_solver(flow_pipe):
    table = flow_table()
    rec = Recorder(flow_pipe.unet)
    try:
        kw = pipeline_kwargs(table, flow_pipe)
        assert set(kw) == {"sigmas"}
        noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        out = flow_pipe(batch_size=2, latents=noise, output_type="latent", **kw).images
    finally:
        rec.handle.remove()
    assert len(rec.values) == table.nfe
    assert rec.values == pytest.approx([s * 1000 for s in table.sigmas[:-1]], abs=1e-3)
    adapter = ModelAdapter(module=flow_pipe.unet, convention=FlowConvention(1000.0), prediction="flow",
                           sample_shape=(1, 8, 8), name="tiny")
    torch.testing.assert_close(out, sample(adapter, noise, table.sigmas, "euler"), atol=1e-4, rtol=1e-4)


def test_flow_pipeline_default_sigmas_and_timesteps_arguments(flow_pipe):
    rec = Recorder(flow_pipe.unet)
    try:
        flow_pipe(batch_size=1, num_inference_steps=3, output_type="np")
        default = list(rec.values)
        rec.reset()
        flow_pipe(batch_size=1, timesteps=[900.0, 500.0, 100.0], output_type="pt")
        custom = list(rec.values)
        rec.reset()
        img = flow_pipe(batch_size=2, sigmas=[1.0, 0.5], output_type="pil").images
    finally:
        rec.handle.remove()
    # default: the scheduler's own schedule for N steps (as SD3 does)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(3)
    assert default == pytest.approx(ref.timesteps.tolist()) and default[0] == 1000.0
    assert custom == pytest.approx([900.0, 500.0, 100.0])
    assert rec.values == pytest.approx([1000.0, 750.0], abs=1e-3)  # sigmas= gets the shift
    assert len(img) == 2 and img[0].size == (8, 8)


def test_flow_pipeline_save_and_load_round_trip(flow_pipe, tmp_path):
    flow_pipe.save_pretrained(tmp_path / "p")
    index = (tmp_path / "p" / "model_index.json").read_text()
    assert "UnconditionalFlowMatchPipeline" in index
    loaded = UnconditionalFlowMatchPipeline.from_pretrained(tmp_path / "p")
    assert loaded.scheduler.config.shift == 3.0
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = flow_pipe(latents=noise, num_inference_steps=2, output_type="latent").images
    b = loaded(latents=noise, num_inference_steps=2, output_type="latent").images
    torch.testing.assert_close(a, b)


@pytest.mark.skipif(not (embedded_path("digits-flow") / "model_index.json").is_file(), reason="digits-flow not trained yet")
def test_embedded_digits_flow_loads_as_our_pipeline():
    pipe = UnconditionalFlowMatchPipeline.from_pretrained(embedded_path("digits-flow"))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 1.0
    table = flow_table((1.0, 0.6, 0.25, 0.0), model="builtin:digits-flow")
    rec = Recorder(pipe.unet)
    try:
        out = pipe(batch_size=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                   **pipeline_kwargs(table, pipe)).images
    finally:
        rec.handle.remove()
    assert out.shape == (2, 1, 16, 16) and rec.values == pytest.approx([1000.0, 600.0, 250.0], abs=1e-3)
    # the pipeline's samples are our solver's samples on the trained model
    from schedules.adapters import load_model

    adapter = load_model("builtin:digits-flow", probe=False)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, (sample(adapter, noise, table.sigmas, "euler") / 2 + 0.5).clamp(0, 1),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (embedded_path("digits-ddpm") / "model_index.json").is_file(), reason="digits-ddpm not trained yet")
def test_embedded_digits_ddpm_pipeline_matches_our_dpmpp_2m():
    from schedules.adapters import load_model
    from schedules.baselines import karras

    adapter = load_model("builtin:digits-ddpm", probe=False)
    table = karras(adapter, 5, "dpmpp-2m")  # fractional timesteps: installed on a pinned DPMSolverMultistep
    pipe = DDPMPipeline.from_pretrained(embedded_path("digits-ddpm"), use_safetensors=True)
    rec = Recorder(pipe.unet)
    try:
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt",
                   **pipeline_kwargs(table, pipe)).images
    finally:
        rec.handle.remove()
    assert rec.values == pytest.approx(table.timesteps, abs=1e-3)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, (sample(adapter, noise, table.sigmas, "dpmpp-2m") / 2 + 0.5).clamp(0, 1),
                               atol=1e-4, rtol=1e-4)


def test_a_table_for_another_local_model_is_refused(flow_pipe, tmp_path):
    flow_pipe.save_pretrained(tmp_path / "mine")
    pipe = UnconditionalFlowMatchPipeline.from_pretrained(tmp_path / "mine")
    with pytest.raises(StepsmithError, match="searched for builtin:digits-flow"):
        pipeline_kwargs(flow_table(model="builtin:digits-flow"), pipe)
    assert set(pipeline_kwargs(flow_table(model="builtin:digits-flow"), pipe, allow_other_model=True)) == {"sigmas"}
    assert set(pipeline_kwargs(flow_table(model=str(tmp_path / "mine")), pipe)) == {"sigmas"}


def test_flow_heun_table_on_the_flow_pipeline(flow_pipe, caplog):
    table = flow_table((1.0, 0.7, 0.4, 0.15, 0.0), solver="heun")
    rec = Recorder(flow_pipe.unet)
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    try:
        with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"), plugged(table, flow_pipe) as kw:
            assert kw == {"num_inference_steps": 4}  # FlowMatchHeun takes no custom schedule: installed
            out = flow_pipe(latents=noise, output_type="latent", **kw).images
    finally:
        rec.handle.remove()
    assert "FlowMatchHeunDiscreteScheduler" in caplog.text
    assert len(rec.values) == table.nfe == 7
    assert rec.values == pytest.approx([1000, 700, 700, 400, 400, 150, 150], abs=1e-3)
    adapter = ModelAdapter(module=flow_pipe.unet, convention=FlowConvention(1000.0), prediction="flow",
                           sample_shape=(1, 8, 8), name="tiny")
    torch.testing.assert_close(out, sample(adapter, noise, table.sigmas, "heun"), atol=1e-4, rtol=1e-4)


def test_flow_pipeline_dynamic_shift_is_disabled_on_a_copy_and_restored(flow_pipe, caplog):
    orig = flow_pipe.scheduler
    flow_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    dyn = flow_pipe.scheduler
    table = flow_table()
    rec = Recorder(flow_pipe.unet)
    try:
        with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"), plugged(table, flow_pipe) as kw:
            flow_pipe(batch_size=1, output_type="latent", mu=1.5, **kw)
        assert flow_pipe.scheduler is dyn  # restored
    finally:
        rec.handle.remove()
        flow_pipe.scheduler = orig
    assert "use_dynamic_shifting=False" in caplog.text
    assert rec.values == pytest.approx([s * 1000 for s in table.sigmas[:-1]], abs=1e-3)


# ------------------------------------------------------------------ DDPM / DDIM pipelines (no timesteps= argument)


@pytest.mark.parametrize("ts,solver", [((999.0, 731.5, 402.25, 150.0, 33.0), "ddim"), ((999.0, 700.0, 300.0, 40.0), "dpmpp-2m"),
                                       ((999.0, 601.0, 250.0, 20.0), "euler")])
def test_ddpm_pipeline_installs_the_table(ddpm_pipe, ts, solver, caplog):
    table = vp_table(ts, solver)
    rec = Recorder(ddpm_pipe.unet)
    try:
        with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
            kw = pipeline_kwargs(table, ddpm_pipe)
        assert kw == {"num_inference_steps": table.steps}
        assert "DDPMScheduler" in caplog.text and "stochastic" in caplog.text
        out = ddpm_pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
        # running it twice gives the same samples: the table is deterministic, no DDPM noise
        again = ddpm_pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
    finally:
        rec.handle.remove()
        remove_table(ddpm_pipe)
    assert type(ddpm_pipe.scheduler).__name__ == "DDPMScheduler"
    assert len(rec.values) == 2 * table.nfe
    assert rec.values[: table.nfe] == pytest.approx(model_timesteps(table, _Sched()), abs=1e-3)
    torch.testing.assert_close(out, again)
    conv = VPConvention.from_scheduler_config(DDPM_CFG)
    adapter = ModelAdapter(module=ddpm_pipe.unet, convention=conv, prediction="epsilon", sample_shape=(1, 8, 8),
                           name="tiny")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    want = (sample(adapter, noise, table.sigmas, solver) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


def test_ddpm_pipeline_refuses_a_heun_table_it_cannot_scale(ddpm_pipe):
    # HeunDiscrete keeps the state x/α and needs scale_model_input, which DDPMPipeline never calls
    with pytest.raises(StepsmithError, match="scale_model_input"):
        pipeline_kwargs(vp_table((999.0, 601.0, 250.0, 20.0), "heun"), ddpm_pipe)
    assert type(ddpm_pipe.scheduler).__name__ == "DDPMScheduler"


class _Sched:  # a VP scheduler stand-in for model_timesteps
    config = {"_class_name": "DDPMScheduler", **DDPM_CFG}


def test_ddim_pipeline_installs_the_table(ddpm_pipe):
    pipe = DDIMPipeline(ddpm_pipe.unet, DDIMScheduler(**DDPM_CFG))
    table = vp_table()
    rec = Recorder(pipe.unet)
    try:
        kw = pipeline_kwargs(table, pipe)
        pipe(batch_size=1, output_type="np", **kw)
        with pytest.raises(StepsmithError, match="eta=0"):
            pipe(batch_size=1, output_type="np", eta=0.5, **kw)
        with pytest.raises(StepsmithError, match="num_inference_steps=5"):
            pipe(batch_size=1, output_type="np", num_inference_steps=50)
    finally:
        rec.handle.remove()
    assert rec.values[: table.nfe] == pytest.approx(table.timesteps, abs=1e-3)
    assert len(rec.values) == table.nfe + 1  # the eta>0 run stops after its first call


# ------------------------------------------------------------------ bad input: refused before any model call


def _bad_cases():
    wrong_ab = dict(DDPM_CFG, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {
        "vp table into flow pipeline": ("flow", lambda: vp_table(), "vp model but"),
        "flow table into ddpm pipeline": ("ddpm", lambda: flow_table(), "flow model but"),
        "table for another VP model": ("ddpm", lambda: vp_table(cfg=wrong_ab), "another VP noise schedule"),
        "wrong prediction type": ("ddpm", lambda: vp_table(prediction="v"), "v-prediction"),
        "dpmpp-2m table on a flow pipeline": ("flow", lambda: flow_table(solver="dpmpp-2m"), "no diffusers scheduler"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_tables_are_refused_before_the_model_runs(name, flow_pipe, ddpm_pipe):
    which, make, match = _bad_cases()[name]
    pipe = flow_pipe if which == "flow" else ddpm_pipe
    before = pipe.scheduler
    rec = Recorder(pipe.unet)
    try:
        with pytest.raises(StepsmithError, match=match):
            pipe(**pipeline_kwargs(make(), pipe), output_type="np")
    finally:
        rec.handle.remove()
    assert rec.values == [] and pipe.scheduler is before


@pytest.mark.parametrize("bad", [
    dict(sigmas=[1.0, 0.5, 0.0], timesteps=[1000.0]),                 # length mismatch
    dict(sigmas=[1.0, 0.5, 0.5, 0.0], timesteps=[1000.0, 500.0, 499.0]),  # duplicate step
    dict(sigmas=[1.0, 0.5, 0.1], timesteps=[1000.0, 500.0]),          # no terminal 0
    dict(sigmas=[12.0, 0.5, 0.0], timesteps=[999.0, 500.0]),          # VP sigmas labelled flow
])
def test_malformed_tables_never_reach_the_pipeline(bad):
    with pytest.raises(StepsmithError, match="invalid timestep table"):
        TimestepTable(**bad, solver="euler", prediction="flow", convention="flow", method="t", model="t")


def test_unsupported_scheduler_without_swap_lists_the_supported_ones(ddpm_pipe):
    with pytest.raises(StepsmithError, match="EulerDiscreteScheduler.*DPMSolverMultistepScheduler"):
        pipeline_kwargs(vp_table(), ddpm_pipe, swap=False)


def test_euler_discrete_pipeline_scheduler_is_kept_for_an_euler_table(ddpm_pipe):
    cfg = {k: v for k, v in DDPM_CFG.items() if k != "clip_sample"}
    sch = EulerDiscreteScheduler(**cfg, timestep_spacing="leading")
    pipe = UnconditionalFlowMatchPipeline(ddpm_pipe.unet, sch)  # any pipeline taking sigmas= works
    table = vp_table(solver="euler")
    kw = pipeline_kwargs(table, pipe)
    assert pipe.scheduler is sch and len(kw["sigmas"]) == table.steps + 1
    # with linspace spacing its init_noise_sigma would be σ0, not sqrt(σ0²+1): a copy runs the table
    pipe.scheduler = EulerDiscreteScheduler(**cfg, timestep_spacing="linspace")
    pipeline_kwargs(table, pipe)
    assert pipe.scheduler.config.timestep_spacing == "leading"


def test_repeated_plugging_reuses_the_checked_plan(ddpm_pipe):
    table = vp_table()
    try:
        kw = pipeline_kwargs(table, ddpm_pipe)
        first = ddpm_pipe.scheduler
        remove_table(ddpm_pipe)
        assert type(ddpm_pipe.scheduler).__name__ == "DDPMScheduler"
        assert pipeline_kwargs(table, ddpm_pipe) == kw and ddpm_pipe.scheduler is first
        other = vp_table((999.0, 500.0, 20.0))
        assert pipeline_kwargs(other, ddpm_pipe) == {"num_inference_steps": 3} and ddpm_pipe.scheduler is not first
        ddpm_pipe.scheduler.set_timesteps(3)
        assert ddpm_pipe.scheduler.timesteps.tolist() == pytest.approx(other.timesteps)
    finally:
        remove_table(ddpm_pipe)


def test_input_scaling_is_read_from_the_pipeline_code_not_its_text(ddpm_pipe, flow_pipe):
    from schedules.diffusers import pipeline_scales_input

    assert pipeline_scales_input(flow_pipe)
    assert not pipeline_scales_input(ddpm_pipe)
    assert not pipeline_scales_input(DDIMPipeline(ddpm_pipe.unet, DDIMScheduler(**DDPM_CFG)))
    # a docstring that mentions the names does not count; code without a source file does
    mentions = type("Mentions", (DDPMPipeline,), {"__doc__": "calls scale_model_input and init_noise_sigma"})
    assert not pipeline_scales_input(mentions(ddpm_pipe.unet, DDPMScheduler(**DDPM_CFG)))
    namespace: dict = {}
    exec("def __call__(self, x):\n    x = x * self.scheduler.init_noise_sigma\n"
         "    return self.scheduler.scale_model_input(x, 0)\n", namespace)
    scaling = type("Scaling", (DDPMPipeline,), {"__call__": namespace["__call__"]})
    assert pipeline_scales_input(scaling(ddpm_pipe.unet, DDPMScheduler(**DDPM_CFG)))
