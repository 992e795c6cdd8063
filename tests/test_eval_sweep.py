"""NFE sweeps: report contents, held-out seeds, real-data caching, CLI, bad input."""

import json
import math

import pytest
import torch
from torch import nn

from eval.data import load_real_data, real_feature_stats
from eval.features import load_feature_network
from eval.metrics import fid, lowdim_metrics, teacher_fidelity
from eval.sweep import reference_batched, run_sweep
from schedules.adapters import ModelAdapter
from schedules.baselines import uniform
from schedules.conventions import FlowConvention
from schedules.io import StepsmithError, save_safetensors
from schedules.solvers import sample


class GaussFlow(nn.Module):
    """Exact FlowMatch velocity for per-pixel Gaussian data N(mu, sd²): a cheap image model."""

    def __init__(self, sd: float = 0.5, mu: float = -0.3):
        super().__init__()
        self.sd, self.mu = sd, mu

    def forward(self, x, t):
        s = t.view(-1, 1, 1, 1).to(x.dtype)
        a = 1 - s
        x0 = self.mu + a * self.sd**2 * (x - a * self.mu) / (a**2 * self.sd**2 + s**2)
        return (x - x0) / s


def gauss_model() -> ModelAdapter:
    return ModelAdapter(module=GaussFlow(), convention=FlowConvention(time_scale=1.0), prediction="flow",
                        sample_shape=(1, 16, 16), name="gauss-images")


def gauss_real(n=400, seed=5):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.5 - 0.3


def test_toy2d_sweep_report(toy2d, tmp_path):
    rep = run_sweep(toy2d, methods=["uniform"], nfe=[1, 8], num=300, out=tmp_path, teacher_steps=20, grid=50,
                    progress=False)
    assert rep["metric"] == "wasserstein" and rep["eval_seed"] == 10_000 and rep["seeds_disjoint"]
    for f in ("report.json", "report.md", "quality_vs_nfe.png"):
        assert (tmp_path / f).stat().st_size > 0
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert [r["nfe"] for r in on_disk["results"]] == [1, 8]
    r1, r8 = rep["results"]
    assert r1["value"] > r8["value"] > 0.5 * rep["teacher"]["value"]
    assert r1["n"] == 300 and r1["solver"] == "euler" and r1["model_calls"] == 1
    assert set(r1["timings"]) == {"table_seconds", "sample_seconds", "metric_seconds"}
    assert (tmp_path / r8["grid"]).is_file() and (tmp_path / rep["teacher"]["grid"]).is_file()
    md = (tmp_path / "report.md").read_text()
    assert "**" in md and "teacher (Heun 20 steps" in md
    # the number equals the metric recomputed independently from the same noises
    from schedules.embedded.nets import toy2d_data

    x = sample(toy2d, toy2d.noise(300, 10_000), uniform(toy2d, 8).sigmas, "euler")
    indep = lowdim_metrics(x, toy2d_data(300, seed=10_001))
    assert r8["value"] == pytest.approx(indep["wasserstein"], rel=1e-6)
    assert r8["extra"]["mmd"] == pytest.approx(indep["mmd"], rel=1e-6, abs=1e-9)
    ref = reference_batched(toy2d, toy2d.noise(300, 10_000), 20, 1000)
    assert r8["extra"]["teacher_mse"] == pytest.approx(teacher_fidelity(x, ref)["mse"], rel=1e-6)


def test_image_sweep_fid_matches_metric_and_caches(tmp_path):
    model, real = gauss_model(), gauss_real()
    kw = dict(methods=["uniform"], nfe=[1, 6], num=200, real=real, teacher_steps=10, grid=16, cache=tmp_path / "c",
              progress=False)
    rep = run_sweep(model, out=tmp_path / "a", **kw)
    assert rep["warnings"] == []
    assert rep["real"]["stats_cache"]["hit"] is False
    assert rep["real"]["feature_network"]["name"] == "digits-features"
    x = sample(model, model.noise(200, 10_000), uniform(model, 6).sigmas, "euler")
    net = load_feature_network("digits-features")
    assert rep["results"][1]["value"] == pytest.approx(fid(real, x, net), rel=1e-6)
    assert rep["results"][0]["value"] > rep["results"][1]["value"]
    rep2 = run_sweep(model, out=tmp_path / "b", **kw)
    assert rep2["real"]["stats_cache"]["hit"] is True
    assert [r["value"] for r in rep2["results"]] == pytest.approx([r["value"] for r in rep["results"]], rel=1e-12)


def test_real_stats_cache_keys_and_atomic(tmp_path):
    net = load_feature_network("digits-features")
    real = gauss_real(64)
    s1, i1 = real_feature_stats(real, net, cache=tmp_path)
    s2, i2 = real_feature_stats(real, net, cache=tmp_path)
    assert not i1["hit"] and i2["hit"] and i1["key"] == i2["key"]
    assert torch.equal(s1.outer_sum, s2.outer_sum) and s2.n == 64
    assert sorted(p.name for p in (tmp_path / "real_stats").iterdir()) == [f"{i1['key']}.safetensors"]  # no temp files
    _, i3 = real_feature_stats(real + 1e-3, net, cache=tmp_path)  # other data -> other key
    assert not i3["hit"] and i3["key"] != i1["key"]
    other = load_feature_network("digits-features")
    with torch.no_grad():
        other.net.head.bias.add_(1.0)  # other weights -> other key
    assert other.weights_hash() != net.weights_hash()
    (tmp_path / "real_stats" / f"{i1['key']}.safetensors").write_bytes(b"garbage")  # corrupt entry: recomputed
    s4, i4 = real_feature_stats(real, net, cache=tmp_path)
    assert not i4["hit"] and torch.allclose(s4.sum, s1.sum)


def test_teacher_metric_and_kid(tmp_path):
    model, real = gauss_model(), gauss_real(300)
    rep = run_sweep(model, methods=["uniform"], nfe=[2], num=150, metric="teacher", teacher_steps=10, grid=0,
                    progress=False)
    x = sample(model, model.noise(150, 10_000), uniform(model, 2).sigmas, "euler")
    ref = reference_batched(model, model.noise(150, 10_000), 10, 1000)
    assert rep["results"][0]["value"] == pytest.approx(teacher_fidelity(x, ref)["mse"], rel=1e-9)
    rep = run_sweep(model, methods=["uniform"], nfe=[1, 6], num=150, metric="kid", real=real, teacher=False,
                    kid_subsets=5, cache=tmp_path, progress=False)
    assert rep["teacher"] is None and rep["results"][0]["value"] > rep["results"][1]["value"]
    assert "kid_std" in rep["results"][0]["extra"]


def test_held_out_seeds_and_tables(toy2d, tmp_path):
    t = uniform(toy2d, 4)
    t.provenance["seed"] = 10_000
    t.save(tmp_path / "searched.json")
    with pytest.raises(StepsmithError, match="held-out"):
        run_sweep(toy2d, tables=[tmp_path / "searched.json"], num=50, teacher=False, progress=False)
    t.provenance["seed"] = 0
    t.save(tmp_path / "searched.json")
    uniform(toy2d, 2).save(tmp_path / "u2.json")
    rep = run_sweep(toy2d, tables=[tmp_path / "searched.json", tmp_path / "u2.json"], num=50, teacher=False,
                    grid=0, progress=False)
    assert rep["search_seeds"] == [0] and rep["eval_seed"] == 10_000
    assert [(r["label"], r["nfe"]) for r in rep["results"]] == [("uniform", 4), ("uniform", 2)]


def test_bad_inputs(toy2d, tmp_path):
    model = gauss_model()
    with pytest.raises(StepsmithError, match="--real"):
        run_sweep(model, methods=["uniform"], nfe=[2], num=20, teacher=False, progress=False)
    with pytest.raises(StepsmithError, match="shape"):
        run_sweep(model, methods=["uniform"], nfe=[2], num=20, real=torch.zeros(30, 3, 16, 16), teacher=False,
                  progress=False)
    with pytest.raises(StepsmithError, match="at least 2"):
        run_sweep(toy2d, methods=["uniform"], nfe=[2], num=1, progress=False)
    with pytest.raises(StepsmithError, match="wasserstein"):
        run_sweep(toy2d, methods=["uniform"], nfe=[2], num=20, metric="fid", progress=False)
    with pytest.raises(StepsmithError, match="nothing to evaluate"):
        run_sweep(toy2d, num=20, progress=False)
    with pytest.raises(StepsmithError, match="unknown method"):
        run_sweep(toy2d, methods=["nope"], nfe=[2], num=20, progress=False)
    # real data files: safetensors with an ambiguous key set, PNG folders of mixed sizes
    save_safetensors(tmp_path / "two.safetensors", {"a": torch.zeros(3, 2), "b": torch.zeros(3, 2)})
    with pytest.raises(StepsmithError, match="one tensor"):
        load_real_data(tmp_path / "two.safetensors")
    save_safetensors(tmp_path / "one.safetensors", {"whatever": torch.zeros(3, 1, 16, 16)})
    assert load_real_data(tmp_path / "one.safetensors", (1, 16, 16)).shape == (3, 1, 16, 16)
    with pytest.raises(StepsmithError, match="shape"):
        load_real_data(tmp_path / "one.safetensors", (1, 8, 8))
    from PIL import Image

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    Image.new("L", (16, 16), 255).save(pngs / "a.png")
    Image.new("L", (16, 16), 0).save(pngs / "a2.png")
    x = load_real_data(pngs, (1, 16, 16))
    assert x.shape == (2, 1, 16, 16) and x.max() == 1.0 and x.min() == -1.0
    Image.new("L", (8, 8), 0).save(pngs / "b.png")
    with pytest.raises(StepsmithError, match="different sizes"):
        load_real_data(pngs, (1, 16, 16))


def test_cli_eval(tmp_path, capsys):
    from schedules.cli import main

    code = main(["eval", "--model", "builtin:toy2d-flow", "--methods", "uniform", "--nfe", "2,4", "--num", "60",
                 "--teacher-steps", "5", "--out", str(tmp_path / "o")])
    assert code == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["command"].startswith("stepsmith eval --model builtin:toy2d-flow")
    assert [r["nfe"] for r in rep["results"]] == [2, 4] and all(math.isfinite(r["value"]) for r in rep["results"])
    assert "Wasserstein" in capsys.readouterr().out
    assert main(["eval", "--model", "builtin:toy2d-flow", "--methods", "uniform", "--num", "1",
                 "--out", str(tmp_path / "p")]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--model", "builtin:toy2d-flow", "--methods", "uniform", "--nfe", "two", "--out", "x"])


def test_custom_sampler_and_file_feature_network(tmp_path):
    model, real = gauss_model(), gauss_real(200)
    (tmp_path / "feat.py").write_text(
        "import torch\n\nclass Pool(torch.nn.Module):\n    def forward(self, x):\n"
        "        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x.flatten(1)[:, :6]], 1)\n")
    kw = dict(methods=["uniform"], nfe=[2, 4], num=120, real=real, teacher=False, grid=0, use_cache=False,
              features=f"{tmp_path / 'feat.py'}:Pool", progress=False)
    base = run_sweep(model, **kw)
    assert base["real"]["feature_network"]["num_features"] == 8
    calls = []

    def my_sampler(table, noise):
        calls.append(table.nfe)
        return sample(model, noise, table.sigmas, table.solver)

    hooked = run_sweep(model, sampler=my_sampler, **kw)
    assert calls == [2, 4]
    assert [r["value"] for r in hooked["results"]] == pytest.approx([r["value"] for r in base["results"]], rel=1e-9)
    with pytest.raises(StepsmithError, match="one sample per noise"):
        run_sweep(model, sampler=lambda _t, z: z[:1], **kw)
