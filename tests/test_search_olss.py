"""OLSS: least squares, the path search, the table's olss block, replay (and its refusals), the CLI and
the stateless diffusers scheduler."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from schedules.adapters import ModelAdapter, load_model
from schedules.cli import main
from schedules.conventions import FlowConvention, VPConvention
from schedules.diffusers import apply_table, pipeline_kwargs, remove_table
from schedules.diffusers.olss_scheduler import OLSSScheduler
from schedules.embedded.nets import digits_unet_config
from schedules.io import StepsmithError
from schedules.pipeline import UnconditionalFlowMatchPipeline
from schedules.search import SEARCHED, make_table, method_options
from schedules.search.common import make_grid
from schedules.search.olss import (
    _ClosedScorer,
    _Gram,
    ddim_coefficients,
    fit_closed_loop,
    fit_path,
    lstsq_fit,
    olss_sample,
    olss_table,
    pad_path,
    ridge_fit,
    search_path,
    teacher_trajectories,
)
from schedules.search.toys import gaussian_adapter
from schedules.solvers import sample, sample_table
from schedules.table import TimestepTable, load_table
from schedules.teacher import Teacher, teacher_sample

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    return load_model("builtin:toy2d-flow", probe=False)


@pytest.fixture(scope="module")
def toy_table(toy):
    return make_table(toy, "olss", 4, samples=64, seed=0, teacher_steps=100)


# ------------------------------------------------------------------ least squares and the path search


def test_lstsq_recovers_known_coefficients():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(50, 3, 4, generator=g) for _ in range(4)]
    w = [0.3, -1.2, 2.0, 0.05]
    target = sum(c * f.double() for c, f in zip(w, feats))
    coef, err = lstsq_fit(feats, target)
    assert coef == pytest.approx(w, abs=1e-10) and err < 1e-20
    noisy = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    coef2, err2 = lstsq_fit(feats, noisy)
    assert coef2 == pytest.approx(w, abs=0.05) and err2 == pytest.approx(0.01, rel=0.3)


def test_walk_errors_are_the_least_squares_errors_of_the_replay_fit(toy):
    grid = make_grid(toy.convention, 30)
    traj = teacher_trajectories(toy, toy.noise(16, 0), grid, batch_size=8)
    assert traj.states.shape == (31, 16, 2) and traj.outputs.shape == (30, 16, 2)
    # compared batch by batch: CPU matmul kernels may round the last bit differently per batch size
    noise = toy.noise(16, 0)
    assert torch.equal(traj.states[-1], torch.cat([sample(toy, noise[:8], grid, "euler"),
                                                   sample(toy, noise[8:], grid, "euler")]))
    gram = _Gram(traj, chunk=5)
    path = [0, 7, 15]
    errs = gram.errors(path)
    for j in (16, 22, 30):
        feats = [traj.states[0]] + [traj.outputs[p] for p in path]
        assert float(errs[j]) == pytest.approx(lstsq_fit(feats, traj.states[j])[1], rel=1e-6, abs=1e-12)
    assert torch.isinf(errs[:16]).all()
    found, tau, _ = search_path(traj, 4)
    assert len(found) == 4 and found[0] == 0 and found == sorted(set(found))
    rows, step_errs = fit_path(traj, found)
    assert [len(r) for r in rows] == [2, 3, 4, 5]
    assert max(step_errs) <= tau * (1 + 1e-6) + 1e-12  # every step of the walk's path fits within the threshold


def test_pad_path_splits_the_longest_jumps():
    assert pad_path([0], 3, 100) == [0, 25, 50]  # ties: the earliest jump first
    assert pad_path([0, 90], 3, 100) == [0, 45, 90]
    with pytest.raises(StepsmithError, match="do not fit"):
        pad_path([0, 1], 3, 2)


# ------------------------------------------------------------------ the table


def test_olss_beats_euler_along_the_same_nodes_on_toy2d(toy, toy_table):
    t = toy_table
    assert t.solver == "olss" and t.method == "olss" and t.nfe == 4 and t.steps == 4
    assert t.olss["version"] == 1 and t.olss["prediction"] == "flow" and t.olss["guidance"] is None
    assert [len(r) for r in t.olss["coefficients"]] == [2, 3, 4, 5]
    assert t.provenance["teacher"]["steps"] == 100 and t.provenance["solver"] == "olss"
    noise = toy.noise(512, 10_000)  # held-out seeds
    ref = teacher_sample(toy, noise, Teacher("heun", 200)).x
    calls = toy.calls
    x = sample_table(toy, noise, t)
    assert toy.calls - calls == 4
    err_olss = float(((x - ref) ** 2).mean())
    err_euler = float(((sample(toy, noise, t.sigmas, "euler") - ref) ** 2).mean())
    assert err_olss < 0.7 * err_euler, (err_olss, err_euler)


def test_exact_on_gaussian_data():
    # Gaussian data: the exact flow is linear in x_T, so one coefficient row already reproduces the teacher
    ad = gaussian_adapter("flow", 0.3, mean=0.5, dim=4)
    t = olss_table(ad, 2, samples=16, teacher_steps=40)
    assert max(t.provenance["step_errors"]) < 1e-12
    grid = make_grid(ad.convention, 40)
    noise = ad.noise(8, 3)
    torch.testing.assert_close(olss_sample(ad, noise, t), sample(ad, noise, grid, "euler"), atol=1e-5, rtol=1e-5)


def test_json_round_trip_keeps_the_block(toy_table, tmp_path, toy):
    path = toy_table.save(tmp_path / "olss.json")
    d = json.loads(path.read_text())
    assert d["solver"] == "olss" and list(d)[-1] == "olss"
    back = load_table(path)
    assert back.to_dict() == toy_table.to_dict()
    noise = toy.noise(16, 1)
    assert torch.equal(sample_table(toy, noise, back), sample_table(toy, noise, toy_table))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["olss"]["coefficients"][2].pop(), "row 2 must hold 4"),
    (lambda d: d["olss"]["coefficients"].pop(), "list of 4 rows"),
    (lambda d: d["olss"].update(version=2), "version 2"),
    (lambda d: d["olss"].update(prediction="epsilon"), "prediction 'epsilon'"),
    (lambda d: d.pop("olss"), "needs the olss block"),
    (lambda d: d.update(solver="euler"), "goes with solver 'olss'"),
    (lambda d: d["olss"]["coefficients"][0].__setitem__(0, "x"), "row 0 must hold 2 finite"),
])
def test_a_broken_block_is_refused(toy_table, edit, match):
    d = json.loads(json.dumps(toy_table.to_dict()))
    edit(d)
    with pytest.raises(StepsmithError, match=match):
        TimestepTable.from_dict(d)


def test_replay_refuses_another_prediction_or_guidance_before_any_model_call():
    eps = gaussian_adapter("vp", 0.5, dim=3, prediction="epsilon")
    t = olss_table(eps, 3, samples=8, teacher_steps=20)
    v = gaussian_adapter("vp", 0.5, dim=3, prediction="v")
    with pytest.raises(StepsmithError, match="epsilon-prediction outputs but .* predicts v"):
        olss_sample(v, v.noise(2, 0), t)
    guided = TimestepTable.from_dict({**t.to_dict(), "olss": {**t.olss, "guidance": 3.0}})
    with pytest.raises(StepsmithError, match="fitted with guidance 3 but .* unconditional run"):
        olss_sample(eps, eps.noise(2, 0), guided)
    calls = eps.calls
    with pytest.raises(StepsmithError, match="sample_table"):
        sample(eps, eps.noise(2, 0), t.sigmas, "olss")  # a sigma list alone cannot replay OLSS
    with pytest.raises(StepsmithError, match="replays only a table made by --method olss"):
        sample_table(eps, eps.noise(2, 0), TimestepTable.from_sigmas(t.sigmas, convention=eps.convention,
                     prediction="epsilon", solver="euler", method="x", model="x"), "olss")
    assert eps.calls == calls
    # its nodes still replay with another solver
    assert torch.isfinite(sample_table(eps, eps.noise(2, 0), t, "euler")).all()


def test_registry_and_options():
    assert SEARCHED["olss"] is olss_table
    assert {"teacher_steps", "bisection", "batch_size"} <= set(method_options("olss"))
    ad = gaussian_adapter("flow", 0.3, dim=2)
    with pytest.raises(StepsmithError, match="--solver olss | euler | ddim"):
        make_table(ad, "olss", 3, "heun", samples=4)
    with pytest.raises(StepsmithError, match="fit a OLSS teacher grid"):
        make_table(ad, "olss", 12, samples=4, teacher_steps=10)


def test_cli_search_and_sample(tmp_path, capsys):
    out = tmp_path / "olss.json"
    rc = main(["search", "--model", "builtin:toy2d-flow", "--method", "olss", "--nfe", "3", "--samples", "16",
               "--option", "teacher_steps=30", "--no-progress", "--out", str(out)])
    assert rc == 0
    t = load_table(out)
    assert t.solver == "olss" and t.nfe == 3 and len(t.olss["coefficients"]) == 3
    assert "--method olss" in t.provenance["command"]
    capsys.readouterr()
    assert main(["sample", "--model", "builtin:toy2d-flow", "--table", str(out), "--num", "16",
                 "--out", str(tmp_path / "s.png"), "--save-tensor", str(tmp_path / "s.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["model_calls"] == 3 and "olss" in info["schedule"]
    from schedules.io import load_safetensors

    x = load_safetensors(tmp_path / "s.safetensors")["samples"]
    toy = load_model("builtin:toy2d-flow", probe=False)
    torch.testing.assert_close(x, olss_sample(toy, toy.noise(16, 0), t))


# ------------------------------------------------------------------ the diffusers scheduler


def _tiny_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    cfg = digits_unet_config()
    cfg.update(block_out_channels=(8, 16), norm_num_groups=4, sample_size=8)
    return UNet2DModel(**cfg).eval()


@pytest.fixture(scope="module")
def flow_setup():
    unet = _tiny_unet(0)
    pipe = UnconditionalFlowMatchPipeline(unet, FlowMatchEulerDiscreteScheduler(shift=3.0))
    ad = ModelAdapter(module=unet, convention=FlowConvention(1000.0), prediction="flow", sample_shape=(1, 8, 8),
                      name="tiny-flow")
    return pipe, ad, olss_table(ad, 3, samples=8, teacher_steps=20)


def test_pipeline_with_the_olss_scheduler_matches_olss_sample_and_is_stateless(flow_setup):
    pipe, ad, table = flow_setup
    original = pipe.scheduler
    try:
        kw = pipeline_kwargs(table, pipe)
        assert kw == {"num_inference_steps": 3} and isinstance(pipe.scheduler, OLSSScheduler)
        sch = pipe.scheduler
        assert sch.order == 1 and sch.init_noise_sigma == 1.0 and sch.guidance is None
        assert sch.timesteps.tolist() == pytest.approx([s * 1000 for s in table.sigmas[:-1]], abs=1e-3)
        noise = ad.noise(3, 7)
        a = pipe(batch_size=3, latents=noise, output_type="latent", **kw).images
        assert sch._outputs == [] and sch._x_T is None  # nothing survives a run
        b = pipe(batch_size=3, latents=noise, output_type="latent", **kw).images
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, olss_sample(ad, noise, table), atol=1e-5, rtol=1e-5)
        with pytest.raises(StepsmithError, match="num_inference_steps=3"):
            pipe(batch_size=1, num_inference_steps=5, output_type="latent")
        # a run abandoned half-way does not leak into the next one
        sch.set_timesteps(3)
        sch.step(torch.ones_like(noise), sch.timesteps[0], noise)
        c = pipe(batch_size=3, latents=noise, output_type="latent", **kw).images
        torch.testing.assert_close(c, a, atol=0, rtol=0)
        with pytest.raises(StepsmithError, match="next timestep"):
            sch.step(noise, sch.timesteps[2], noise)
    finally:
        remove_table(pipe)
    assert pipe.scheduler is original


def test_scheduler_save_load_and_apply_table(flow_setup, tmp_path):
    pipe, ad, table = flow_setup
    sch = OLSSScheduler.from_table(table, {**pipe.scheduler.config, "_class_name": "FlowMatchEulerDiscreteScheduler"})
    sch.save_pretrained(tmp_path / "s")
    again = OLSSScheduler.from_pretrained(tmp_path / "s")
    assert again.table.to_dict() == table.to_dict() and again.timesteps.tolist() == sch.timesteps.tolist()
    driven = apply_table(table, pipe.scheduler)
    assert isinstance(driven, OLSSScheduler)
    noise = ad.noise(2, 4)
    x = noise
    for t in driven.timesteps:
        out = pipe.unet(driven.scale_model_input(x, t), t.expand(2)).sample
        x = driven.step(out, t, x).prev_sample
    torch.testing.assert_close(x, olss_sample(ad, noise, table), atol=1e-5, rtol=1e-5)
    with pytest.raises(StepsmithError, match="not an OLSS table"):
        OLSSScheduler.from_table(TimestepTable.from_sigmas(table.sigmas, convention=ad.convention, prediction="flow",
                                                           solver="euler", method="u", model="u"), pipe.scheduler)


def test_ddpm_pipeline_replays_a_vp_olss_table():
    cfg = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
               prediction_type="epsilon", clip_sample=False)
    unet = _tiny_unet(1)
    pipe = DDPMPipeline(unet, DDPMScheduler(**cfg))
    ad = ModelAdapter(module=unet, convention=VPConvention.from_scheduler_config(cfg), prediction="epsilon",
                      sample_shape=(1, 8, 8), name="tiny-ddpm")
    table = olss_table(ad, 3, samples=8, teacher_steps=20)
    try:
        kw = pipeline_kwargs(table, pipe)
        a = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
        b = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
    finally:
        remove_table(pipe)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, (olss_sample(ad, noise, table) / 2 + 0.5).clamp(0, 1), atol=2e-4, rtol=2e-4)
    # a v-prediction pipeline is refused before any model call
    pipe_v = DDPMPipeline(unet, DDPMScheduler(**{**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(StepsmithError, match="v"):
        pipeline_kwargs(table, pipe_v)
    assert isinstance(pipe_v.scheduler, DDPMScheduler)


def test_eval_sweep_replays_an_olss_table(toy, toy_table):
    from eval.sweep import run_sweep

    rep = run_sweep(toy, tables=[toy_table], num=64, metric="teacher", teacher_steps=20, grid=0, progress=False)
    row = rep["results"][0]
    assert row["solver"] == "olss" and row["model_calls"] == 4
    noise = toy.noise(64, 10_000)
    ref = teacher_sample(toy, noise, Teacher("heun", 20)).x
    assert row["value"] == pytest.approx(float(((sample_table(toy, noise, toy_table) - ref) ** 2).mean()), rel=1e-6)


# ------------------------------------------------------------------ the closed-loop fit


@pytest.mark.parametrize("kind,pred", [("flow", "flow"), ("vp", "epsilon"), ("vp", "v")])
def test_ddim_coefficients_are_the_euler_step(kind, pred):
    ad = gaussian_adapter(kind, 0.4, dim=3, prediction=pred)
    grid = make_grid(ad.convention, 10)
    traj = teacher_trajectories(ad, ad.noise(4, 0), grid)
    for n in (0, 4, 9):
        a, b = ddim_coefficients(ad.convention, pred, grid[n], grid[n + 1])
        step = a * traj.states[n].double() + b * traj.outputs[n].double()
        torch.testing.assert_close(step.float(), traj.states[n + 1], atol=1e-5, rtol=1e-5)


def test_ridge_fit_shrinks_and_reduces_to_lstsq():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, generator=g)
    feats = [base, base + 1e-3 * torch.randn(200, generator=g), torch.randn(200, generator=g)]  # two collinear
    y = 3 * feats[0] - 2 * feats[1] + 0.5 * feats[2] + 0.01 * torch.randn(200, generator=g)
    c0, e0 = ridge_fit(feats, y, 0.0)
    assert c0 == pytest.approx(lstsq_fit(feats, y)[0], rel=1e-9)
    c1, e1 = ridge_fit(feats, y, 1e-2)
    assert sum(c * c for c in c1) < sum(c * c for c in c0) and e1 >= e0 - 1e-15
    assert ridge_fit(feats, y, 1e6)[0] == pytest.approx([0, 0, 0], abs=1e-3)
    with pytest.raises(StepsmithError, match="ridge"):
        olss_table(gaussian_adapter("flow", 0.3, dim=2), 2, samples=4, teacher_steps=10, ridge=-1.0)
    with pytest.raises(StepsmithError, match="closed | open"):
        olss_table(gaussian_adapter("flow", 0.3, dim=2), 2, samples=4, teacher_steps=10, fit="sideways")


@pytest.fixture(scope="module")
def ddpm():
    return load_model("builtin:digits-ddpm", probe=False)


def test_closed_loop_fit_replays_better_than_ddim_and_the_open_loop_fit_on_a_vp_eps_model(ddpm):
    ad = ddpm
    grid = make_grid(ad.convention, 30)
    noise = ad.noise(8, 0)
    traj = teacher_trajectories(ad, noise, grid, batch_size=8)
    path, _, _ = search_path(traj, 3)
    sig = [grid[p] for p in path] + [0.0]

    def table(rows):
        t = TimestepTable.from_sigmas(sig, convention=ad.convention, prediction="epsilon", solver="euler",
                                      method="olss", model=ad.name)
        t.solver, t.olss = "olss", {"version": 1, "prediction": "epsilon", "guidance": None, "coefficients": rows}
        t.validate()
        return t

    def err(x):
        return float(((x - traj.states[-1]) ** 2).mean())

    calls = ad.calls
    rows, errs, ddim_errs = fit_closed_loop(ad, traj, path, batch_size=4)
    assert ad.calls - calls == 3 * 2  # one call per step per micro-batch
    assert all(e <= d * (1 + 1e-9) + 1e-15 for e, d in zip(errs, ddim_errs))  # r = 0 (plain DDIM) is feasible
    flat = [w for r in rows for w in r]
    assert all(map(math.isfinite, flat)) and max(map(abs, flat)) < 10 * max(sig)  # bounded weights
    closed = err(olss_sample(ad, noise, table(rows)))
    assert closed == pytest.approx(errs[-1], rel=1e-4)  # the fit saw exactly what the replay does
    ddim = err(sample(ad, noise, sig, "euler"))
    open_loop = err(olss_sample(ad, noise, table(fit_path(traj, path)[0])))
    assert closed <= ddim and closed <= open_loop, (closed, ddim, open_loop)
    # and on held-out noise, against the teacher's grid run from it
    held = ad.noise(8, 10_000)
    ref = sample(ad, held, grid, "euler")
    held_closed = float(((olss_sample(ad, held, table(rows)) - ref) ** 2).mean())
    assert held_closed < float(((sample(ad, held, sig, "euler") - ref) ** 2).mean())


def test_olss_table_records_the_fit_and_keeps_the_better_walk(ddpm):
    t = olss_table(ddpm, 3, samples=4, teacher_steps=20, batch_size=4)
    p = t.provenance
    assert p["fit"] == "closed" and p["ridge"] == 0.0 and len(p["ddim_step_errors"]) == 3
    assert t.objective == pytest.approx(p["step_errors"][-1], rel=1e-4)
    objs = p["walk_objectives"]
    assert set(objs) == {"open", "closed"} and t.objective == min(objs.values()) == objs[p["walk_fit"]]
    for w in ("open", "closed"):
        one = olss_table(ddpm, 3, samples=4, teacher_steps=20, batch_size=4, walk_fit=w)
        assert one.provenance["walk_fit"] == w and "walk_objectives" not in one.provenance
        assert one.objective == pytest.approx(objs[w], rel=1e-6)
    o = olss_table(ddpm, 3, samples=4, teacher_steps=20, batch_size=4, fit="open", walk_fit="open")
    assert o.provenance["fit"] == "open" and "ddim_step_errors" not in o.provenance
    assert o.provenance["path"] == olss_table(ddpm, 3, samples=4, teacher_steps=20, walk_fit="open").provenance["path"]
    with pytest.raises(StepsmithError, match="auto | closed | open"):
        olss_table(ddpm, 3, samples=4, teacher_steps=20, walk_fit="both")


def test_closed_loop_walk_scores_the_fit_the_table_gets(ddpm):
    ad = ddpm
    grid = make_grid(ad.convention, 30)
    traj = teacher_trajectories(ad, ad.noise(8, 0), grid, batch_size=8)
    scorer = _ClosedScorer(ad, traj, batch_size=8)
    path = [0, 12, 20]
    errs = scorer.errors(path)
    assert torch.isinf(errs[:21]).all() and scorer.calls == 3
    rows, step_errs, _ = fit_closed_loop(ad, traj, path)  # its last row fits the end node x_30
    assert float(errs[30]) == pytest.approx(step_errs[-1], rel=1e-3)
    scorer.errors(path)
    assert scorer.calls == 3  # one model call per prefix, cached
    found, tau, _ = search_path(traj, 3, scorer=scorer)
    assert len(found) == 3 and found == sorted(set(found))
    assert max(fit_closed_loop(ad, traj, found)[1]) <= tau * (1 + 1e-3)
