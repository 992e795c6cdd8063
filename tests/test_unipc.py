"""UniPC (bh2): stepsmith's ``unipc`` solver is diffusers' UniPCMultistepScheduler default (order 2,
data prediction, corrector at every step, first order on the last), bit for bit up to float32 —
on the scheduler's own schedules, through ``apply_table`` and through a real pipeline — costs K
model calls for K steps, and is accepted by the CLI (sample, search: baselines and dp)."""

from __future__ import annotations

import json
import logging

import diffusers
import numpy as np
import pytest
import torch

from schedules.adapters import ModelAdapter
from schedules.analytic import GaussianDenoiser
from schedules.cli import main
from schedules.conventions import FlowConvention, VPConvention, x0_to_prediction
from schedules.diffusers import apply_table, pipeline_kwargs, remove_table
from schedules.embedded import embedded_path
from schedules.pipeline import UnconditionalFlowMatchPipeline
from schedules.solvers import SOLVERS, sample
from schedules.table import TimestepTable, load_table
from tests.test_diffusers_schedulers import GaussianNet, drive
from tests.test_pipeline_flow import DDPM_CFG, Recorder, tiny_unet

torch.set_num_threads(1)

VP_CFG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
VP = VPConvention.from_scheduler_config(VP_CFG)
FLOW = FlowConvention(1000.0)
TOY = "builtin:toy2d-flow"


class Wavy:
    """A nonlinear analytic denoiser (Gaussian posterior mean plus a σ-scaled ripple), counting its calls."""

    def __init__(self, conv):
        self.convention, self.calls = conv, 0

    def denoise(self, x, s):
        self.calls += 1
        sb = s.to(torch.float64).view(-1, *([1] * (x.ndim - 1)))
        a, st = self.convention.alpha(sb), self.convention.sigma_t(sb)
        xd = x.to(torch.float64)
        out = 0.3 + a * 0.25 * (xd - a * 0.3) / (a**2 * 0.25 + st**2) + 0.2 * st * torch.sin(3 * xd)
        return out.to(x.dtype)


def drive_by_sigma(sch, den, prediction, x):
    """The diffusers loop, the network answering at the sigma the scheduler holds for the step."""
    conv, lat = den.convention, x.clone()
    for i, t in enumerate(sch.timesteps):
        s = sch.sigmas[i].to(torch.float64)
        x0 = den.denoise(lat.double(), s.expand(lat.shape[0])).double()
        sb = s.view(1, *([1] * (lat.ndim - 1)))
        eps = (lat.double() - conv.alpha(sb) * x0) / conv.sigma_t(sb)
        lat = sch.step(x0_to_prediction(conv, prediction, x0, eps, sb).float(), t, lat, return_dict=False)[0]
    return lat


X = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))


def _ours(conv, sigmas, solver="unipc"):
    return sample(Wavy(conv), X.double(), sigmas, solver).float()


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("K", [1, 3, 6, 10])
def test_unipc_is_diffusers_default_unipc_vp(K, prediction):
    sch = diffusers.UniPCMultistepScheduler(**VP_CFG, prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction])
    assert (sch.config.solver_type, sch.config.solver_order, sch.config.predict_x0) == ("bh2", 2, True)
    sch.set_timesteps(K)  # the scheduler's own sigmas: no stepsmith plumbing involved
    sig = sch.sigmas.double().tolist()
    got = drive_by_sigma(sch, Wavy(VP), prediction, X)
    want = _ours(VP, sig)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    if K >= 3:  # the corrector changes the result: it is not DPM-Solver++(2M) on these sigmas
        assert (_ours(VP, sig, "dpmpp-2m") - want).abs().max() > 1e-3


@pytest.mark.parametrize("sigmas", [(0.98, 0.05), (0.98, 0.6, 0.05), (0.995, 0.8, 0.62, 0.41, 0.2, 0.04),
                                    tuple(np.linspace(0.97, 0.02, 9))])
def test_unipc_is_diffusers_unipc_flow(sigmas):
    sch = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    sch.set_timesteps(sigmas=np.asarray(sigmas))
    sig = sch.sigmas.double().tolist()
    assert len(sig) == len(sigmas) + 1 and sig[-1] == 0
    got = drive_by_sigma(sch, Wavy(FLOW), "flow", X)
    want = _ours(FLOW, sig)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    if len(sigmas) >= 3:
        assert (_ours(FLOW, sig, "dpmpp-2m") - want).abs().max() > 1e-3


def test_unipc_from_sigma_one_is_diffusers_holding_sigma_one():
    """A flow start at σ=1 (α=0, λ=-inf: the limit, exact in our ratio form) equals diffusers' UniPC holding σ=1
    exactly (installed); its own set_timesteps moves σ=1 to 1-1e-6, a different first step."""
    sigmas = [1.0, 0.7, 0.4, 0.15, 0.0]
    ours = _ours(FLOW, sigmas)
    assert torch.isfinite(ours).all()
    table = flow_table(sigmas)
    sch = apply_table(table, diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"))
    assert float(sch.sigmas[0]) == 1.0 and sch.sigmas.tolist() == pytest.approx(sigmas)
    torch.testing.assert_close(drive_by_sigma(sch, Wavy(FLOW), "flow", X), ours, atol=2e-6, rtol=1e-5)
    moved = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    moved.set_timesteps(sigmas=np.array(sigmas[:-1]))
    assert float(moved.sigmas[0]) < 1.0


def test_unipc_costs_k_calls_and_is_more_accurate_than_dpmpp_2m():
    conv = VP
    gauss = GaussianDenoiser(conv, data_std=0.5, mean=0.3)
    sig = VP.sigma_from_model_time(torch.tensor([999.0, 800.0, 600.0, 400.0, 200.0, 60.0], dtype=torch.float64))
    sigmas = sig.tolist() + [0.0]
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * gauss.marginal_std(sigmas[0])
    exact = gauss.exact_solution(x, sigmas[0])
    err = {}
    for solver in ("dpmpp-2m", "unipc"):
        gauss.calls = 0
        err[solver] = float((sample(gauss, x, sigmas, solver) - exact).pow(2).mean().sqrt())
        assert gauss.calls == 6
    assert err["unipc"] < err["dpmpp-2m"]
    assert SOLVERS["unipc"].nfe(6) == 6 and SOLVERS["unipc"].steps_for_nfe(7) == 7
    table = TimestepTable.from_sigmas(sigmas, convention=conv, prediction="epsilon", solver="unipc", method="t", model="t")
    assert table.nfe == table.steps == 6


# ------------------------------------------------------------------ replay through diffusers


def vp_table(ts=(999.0, 731.5, 402.25, 150.0, 33.0), cfg=VP_CFG, prediction="epsilon"):
    conv = VPConvention.from_scheduler_config(cfg)
    sig = conv.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist() + [0.0]
    return TimestepTable.from_sigmas(sig, convention=conv, prediction=prediction, solver="unipc", method="test",
                                     model="test")


def flow_table(sigmas=(1.0, 0.81, 0.55, 0.32, 0.12, 0.0), model="test"):
    return TimestepTable.from_sigmas(list(sigmas), convention=FLOW, prediction="flow", solver="unipc", method="test",
                                     model=model)


@pytest.mark.parametrize("make_table,make_sched", [
    (vp_table, lambda: diffusers.DDPMScheduler(**VP_CFG)),  # swapped in, fractional timesteps installed
    (lambda: vp_table(ts=(999.0, 700.0, 400.0, 100.0)), lambda: diffusers.DPMSolverMultistepScheduler(**VP_CFG)),
    (lambda: vp_table(ts=(999.0, 700.0, 400.0, 100.0)),  # kept, with its corrector switched back on
     lambda: diffusers.UniPCMultistepScheduler(**VP_CFG, disable_corrector=[0, 1, 2])),
    (flow_table, lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)),
    (lambda: flow_table((0.9, 0.7, 0.45, 0.2, 0.0)),  # sigmas= (integral σ·T below T): set_timesteps itself
     lambda: diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")),
    (lambda: flow_table((0.9, 0.7, 0.45, 0.2, 0.0)),  # its flow_shift round trip breaks σ·T = 900: installed
     lambda: diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=2.0, prediction_type="flow_prediction")),
])
def test_apply_table_replays_unipc_tables(make_table, make_sched, caplog):
    table = make_table()
    conv = FLOW if table.convention == "flow" else VP
    with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
        sch = apply_table(table, make_sched(), swap=True)
    assert type(sch).__name__ == "UniPCMultistepScheduler" and sch.config.solver_order == 2
    assert sch.disable_corrector == [] and sch.config.use_flow_sigmas == (table.convention == "flow")
    net = GaussianNet(conv, table.prediction)
    got = drive(sch, net, X)
    want = sample(GaussianDenoiser(conv, data_std=0.5, mean=0.3), X.double(), table.sigmas, "unipc").float()
    assert len(net.timesteps) == table.nfe == table.steps
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_ddpm_pipeline_runs_a_unipc_table_like_our_solver(caplog):
    pipe = DDPMPipeline_tiny()
    table = vp_table(cfg=DDPM_CFG)
    rec = Recorder(pipe.unet)
    try:
        with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
            kw = pipeline_kwargs(table, pipe)
        assert kw == {"num_inference_steps": table.steps}  # DDPMPipeline takes no schedule: a pinned UniPC
        assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and "DDPMScheduler" in caplog.text
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
    finally:
        rec.handle.remove()
        remove_table(pipe)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert rec.values == pytest.approx(table.timesteps, abs=1e-3)
    adapter = ModelAdapter(module=pipe.unet, convention=VPConvention.from_scheduler_config(DDPM_CFG),
                           prediction="epsilon", sample_shape=(1, 8, 8), name="tiny")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    want = sample(adapter, noise, table.sigmas, "unipc")
    torch.testing.assert_close(out, (want / 2 + 0.5).clamp(0, 1), atol=2e-4, rtol=2e-4)
    other = sample(adapter, noise, table.sigmas, "dpmpp-2m")
    assert (other - want).abs().max() > 1e-3  # the replay really is UniPC, not the DPM-Solver it resembles


def DDPMPipeline_tiny():  # noqa: N802 - reads as the class it builds
    return diffusers.DDPMPipeline(tiny_unet(1), diffusers.DDPMScheduler(**DDPM_CFG))


def test_flow_pipeline_runs_a_unipc_table_through_sigmas():
    pipe = UnconditionalFlowMatchPipeline(tiny_unet(0), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    table = flow_table((0.9, 0.7, 0.45, 0.2, 0.0))
    rec = Recorder(pipe.unet)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    try:
        kw = pipeline_kwargs(table, pipe)
        assert set(kw) == {"sigmas"} and type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
        out = pipe(batch_size=2, latents=noise, output_type="latent", **kw).images
    finally:
        rec.handle.remove()
        remove_table(pipe)
    assert rec.values == pytest.approx([900.0, 700.0, 450.0, 200.0], abs=1e-3)
    adapter = ModelAdapter(module=pipe.unet, convention=FLOW, prediction="flow", sample_shape=(1, 8, 8), name="tiny")
    torch.testing.assert_close(out, sample(adapter, noise, table.sigmas, "unipc"), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ command line


def test_cli_sample_and_search_accept_unipc(tmp_path, capsys):
    png = tmp_path / "g.png"
    assert main(["sample", "--model", TOY, "--nfe", "5", "--solver", "unipc", "--num", "16", "--out", str(png)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model_calls"] == 5
    out = tmp_path / "u.json"
    assert main(["search", "--model", TOY, "--method", "uniform", "--nfe", "4", "--solver", "unipc", "--out", str(out)]) == 0
    t = load_table(out)
    assert (t.solver, t.steps, t.nfe) == ("unipc", 4, 4)


def test_dp_search_with_unipc_runs_at_tiny_settings(tmp_path):
    out = tmp_path / "dp.json"
    assert main(["search", "--model", TOY, "--nfe", "3", "--samples", "4", "--grid", "8", "--no-progress",
                 "--solver", "unipc", "--out", str(out)]) == 0
    t = load_table(out)
    assert (t.solver, t.method, t.nfe) == ("unipc", "dp", 3) and t.sigmas[-1] == 0


def test_unipc_takes_sigmas_only_when_its_set_timesteps_reproduces_the_table():
    from schedules.diffusers import native_kwargs

    table = flow_table((0.9, 0.7, 0.45, 0.2, 0.0))
    flow = lambda fs: diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=fs,  # noqa: E731
                                                        prediction_type="flow_prediction")
    assert native_kwargs(table, flow(1.0))["sigmas"].tolist() == pytest.approx([0.9, 0.7, 0.45, 0.2])
    assert native_kwargs(table, flow(2.0)) is None  # 0.9 pre-shifted and shifted back casts to timestep 899
    assert native_kwargs(vp_table(), diffusers.UniPCMultistepScheduler(**VP_CFG)) is None  # VP: sigmas= refused


@pytest.mark.skipif(not (embedded_path("digits-ddpm") / "model_index.json").is_file(), reason="digits-ddpm not trained yet")
def test_embedded_digits_ddpm_pipeline_matches_our_unipc():
    from schedules.adapters import load_model
    from schedules.baselines import karras

    adapter = load_model("builtin:digits-ddpm", probe=False)
    table = karras(adapter, 5, "unipc")  # fractional timesteps: installed on a pinned UniPC
    pipe = diffusers.DDPMPipeline.from_pretrained(embedded_path("digits-ddpm"), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    rec = Recorder(pipe.unet)
    try:
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt",
                   **pipeline_kwargs(table, pipe)).images
    finally:
        rec.handle.remove()
    assert rec.values == pytest.approx(table.timesteps, abs=1e-3) and len(rec.values) == 5
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, (sample(adapter, noise, table.sigmas, "unipc") / 2 + 0.5).clamp(0, 1),
                               atol=1e-4, rtol=1e-4)


def test_a_rollout_resumed_from_a_kept_node_state_continues_the_same_unipc_run():
    """The node states a search keeps carry what the corrector needs (the predecessor's D and σ)."""
    from schedules.search.common import rollout

    sigmas = [0.97, 0.8, 0.6, 0.4, 0.25, 0.1, 0.0]
    den = Wavy(FLOW)
    full, states = rollout(den, "unipc", sigmas, x=X.double(), keep=True)
    torch.testing.assert_close(full, sample(den, X.double(), sigmas, "unipc"))
    for i in (1, 2, 4):
        torch.testing.assert_close(rollout(den, "unipc", sigmas[i:], start=states[i]), full, atol=1e-12, rtol=0)
    assert len(states[3].hist) == 2 and float(states[3].hist[1]) == sigmas[1]
