"""Metric lists in the sweep path: every metric's key and range, MMHM against eval.mmhm, frozen
bounds, the per-NFE tables and plot, and refusals before any model call."""

import json

import pytest

from eval.classifier_metrics import digits_logits, inception_score, probabilities
from eval.features import load_feature_network
from eval.manifold import manifold_metrics
from eval.metrics import extract_features
from eval.mmhm import EPS, GroupedBounds, load_bounds, mmhm
from eval.sweep import run_sweep
from schedules import load_model
from schedules.baselines import uniform
from schedules.io import StepsmithError
from schedules.solvers import sample

pytestmark = pytest.mark.filterwarnings("ignore::eval.metrics.FewSamplesWarning")

LIST = "fid,kid,precision,recall,density,coverage,is,teacher,mmhm"
KW = dict(methods=["uniform", "karras"], nfe=[2], num=64, teacher_steps=3, grid=0, use_cache=False, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_model("builtin:digits-flow")


@pytest.fixture(scope="module")
def digits_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("m")
    rep = run_sweep(digits, metric=LIST, out=out / "a", save_bounds=out / "bounds.json", **KW)
    return rep, out


def test_every_metric_in_range_and_recomputed(digits, digits_run):
    rep, _ = digits_run
    names = LIST.split(",")
    assert rep["metric"] == "fid" and rep["metrics"] == names and rep["lower_is_better"] is True
    for r in rep["results"]:
        m = r["metrics"]
        assert list(m) == names and m["fid"] == r["value"] and m["kid"] == r["extra"]["kid"]
        assert m["teacher"] == r["extra"]["teacher_mse"]
        assert all(0 <= m[k] <= 1 for k in ("precision", "recall", "coverage")) and m["density"] >= 0
        assert 1 <= m["is"] <= 10 and EPS <= m["mmhm"] <= 1 + EPS
    assert "mmhm" not in rep["teacher"]["metrics"] and rep["teacher"]["metrics"]["teacher"] == 0.0
    # independent recomputation of the uniform row from the same noises
    x = sample(digits, digits.noise(64, 10_000), uniform(digits, 2).sigmas, "euler")
    net = load_feature_network("digits-features")
    from schedules.embedded.nets import digits_data

    mm = manifold_metrics(extract_features(net, digits_data()[0]), extract_features(net, x), k=3, k_density=5)
    row = rep["results"][0]["metrics"]
    for k in ("precision", "recall", "density", "coverage"):
        assert row[k] == pytest.approx(getattr(mm, k), rel=1e-9)
    assert row["is"] == pytest.approx(inception_score(probabilities(digits_logits(net, x)))[0], rel=1e-9)
    # MMHM equals eval.mmhm over the rows' values (one NFE group here)
    ref = mmhm([r["metrics"] for r in rep["results"]], names[:-1])
    assert [r["metrics"]["mmhm"] for r in rep["results"]] == pytest.approx(list(ref), rel=1e-12)
    assert rep["mmhm"]["metrics"] == names[:-1] and rep["mmhm"]["eps"] == EPS
    assert rep["mmhm"]["agreement"][0]["nfe"] == 2


def test_report_files_and_frozen_bounds(digits, digits_run):
    rep, out = digits_run
    md = (out / "a" / "report.md").read_text()
    assert "## All metrics per NFE" in md and "### NFE 2" in md and "**FID vs MMHM**" in md and "one NFE" in md
    assert (out / "a" / "metrics_vs_nfe.png").stat().st_size > 0 and (out / "a" / "quality_vs_nfe.png").is_file()
    on_disk = json.loads((out / "a" / "report.json").read_text())
    assert on_disk["results"][0]["metrics"]["mmhm"] == rep["results"][0]["metrics"]["mmhm"]
    bounds = load_bounds(out / "bounds.json")
    assert isinstance(bounds, GroupedBounds) and list(bounds.groups) == ["2"]
    again = run_sweep(digits, metric=LIST, bounds=out / "bounds.json", **{**KW, "methods": ["karras", "uniform"]})
    assert again["mmhm"]["bounds_source"].startswith("frozen")
    scores = {r["label"]: r["metrics"]["mmhm"] for r in rep["results"]}
    assert {r["label"]: r["metrics"]["mmhm"] for r in again["results"]} == pytest.approx(scores, rel=1e-12)
    # one row alone under frozen bounds keeps its score (without them it would be 1 + eps)
    alone = run_sweep(digits, metric=LIST, bounds=bounds, **{**KW, "methods": ["karras"]})
    assert alone["results"][0]["metrics"]["mmhm"] == pytest.approx(scores["karras"], rel=1e-12)
    with pytest.raises(StepsmithError, match="no nfe 4 group"):
        run_sweep(digits, metric=LIST, bounds=bounds, **{**KW, "nfe": [4]})


def test_toy2d_manifold_metrics_on_raw_points(toy2d):
    rep = run_sweep(toy2d, metric="wasserstein,precision,recall,density,coverage,mmhm", methods=["uniform", "karras"],
                    nfe=[1, 3], num=80, teacher=False, grid=0, progress=False)
    from schedules.embedded.nets import toy2d_data

    x = sample(toy2d, toy2d.noise(80, 10_000), uniform(toy2d, 3).sigmas, "euler")
    mm = manifold_metrics(toy2d_data(80, seed=10_001), x)
    row = next(r for r in rep["results"] if r["label"] == "uniform" and r["nfe"] == 3)["metrics"]
    assert row["precision"] == pytest.approx(mm.precision) and row["recall"] == pytest.approx(mm.recall)
    assert row["coverage"] == pytest.approx(mm.coverage) and row["wasserstein"] > 0
    for nfe in (1, 3):  # MMHM per NFE group
        group = [r for r in rep["results"] if r["nfe"] == nfe]
        ref = mmhm([r["metrics"] for r in group], ["wasserstein", "precision", "recall", "density", "coverage"])
        assert [r["metrics"]["mmhm"] for r in group] == pytest.approx(list(ref), rel=1e-12)


def test_one_new_metric_is_the_main_value(toy2d):
    rep = run_sweep(toy2d, metric="recall", methods=["uniform"], nfe=[2], num=40, teacher=False, grid=0,
                    progress=False)
    assert rep["lower_is_better"] is False and rep["results"][0]["value"] == rep["results"][0]["metrics"]["recall"]


def test_legacy_single_name_report_unchanged(toy2d, tmp_path):
    rep = run_sweep(toy2d, methods=["uniform"], nfe=[2], num=40, teacher=False, grid=0, out=tmp_path, progress=False)
    assert "metrics" not in rep and "mmhm" not in rep and "metrics" not in rep["results"][0]
    assert not (tmp_path / "metrics_vs_nfe.png").exists()
    assert "All metrics" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("spec,metric,match", [
    ("digits", "fid,nope", "unknown `metric` 'nope'"),
    ("digits", "fid,fid", "repeats"),
    ("digits", "fid,clip", "CLIP"),
    ("digits", "fid,class-accuracy", "unconditional"),
    ("digits", "fid,wasserstein", "low-dimensional"),
    ("digits", "mmhm,fid", "cannot be the main"),
    ("digits", "teacher,mmhm", None),
    ("toy2d", "wasserstein,fid-teacher", None),
    ("toy2d", "wasserstein,fid", "images"),
    ("toy2d", "wasserstein,is", "classifier"),
    ("toy2d", "mmhm", "cannot be the main"),
])
def test_bad_metric_lists_refused_before_any_model_call(digits, toy2d, spec, metric, match):
    model = digits if spec == "digits" else toy2d
    calls = model.calls
    if match is None:  # a valid list, refused for --no-teacher
        with pytest.raises(StepsmithError, match="teacher=True"):
            run_sweep(model, metric=metric, methods=["dp"], nfe=[2], num=20, teacher=False, progress=False)
    else:
        with pytest.raises(StepsmithError, match=match):
            run_sweep(model, metric=metric, methods=["dp"], nfe=[2], num=20, progress=False)
    assert model.calls == calls


def test_is_needs_a_classifier_head_and_bounds_need_mmhm(digits, tmp_path):
    (tmp_path / "feat.py").write_text("import torch\n\nclass Pool(torch.nn.Module):\n    def forward(self, x):\n"
                                      "        return x.flatten(1)[:, :8]\n")
    with pytest.raises(StepsmithError, match="no classifier head"):
        run_sweep(digits, metric="fid,is", features=f"{tmp_path / 'feat.py'}:Pool", methods=["dp"], nfe=[2], num=20,
                  progress=False)
    with pytest.raises(StepsmithError, match="add mmhm"):
        run_sweep(digits, metric="fid,kid", save_bounds=tmp_path / "b.json", methods=["dp"], nfe=[2], num=20,
                  progress=False)
    (tmp_path / "b.json").write_text('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"fid": {"min": 1, "max": 2}}}')
    with pytest.raises(StepsmithError, match="no range for kid"):
        run_sweep(digits, metric="fid,kid,mmhm", bounds=tmp_path / "b.json", methods=["dp"], nfe=[2], num=20,
                  progress=False)


def test_cli_metric_list_and_bad_name_exit_2(tmp_path, capsys):
    from schedules.cli import main

    out = tmp_path / "o"
    code = main(["eval", "--model", "builtin:toy2d-flow", "--methods", "uniform,karras", "--nfe", "2", "--num", "50",
                 "--no-teacher", "--metric", "wasserstein,precision,recall,mmhm", "--save-bounds",
                 str(tmp_path / "b.json"), "--out", str(out)])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"] == ["wasserstein", "precision", "recall", "mmhm"]
    assert "MMHM" in capsys.readouterr().out
    code = main(["eval", "--model", "builtin:toy2d-flow", "--methods", "uniform,karras", "--nfe", "2", "--num", "50",
                 "--no-teacher", "--metric", "wasserstein,precision,recall,mmhm", "--bounds", str(tmp_path / "b.json"),
                 "--out", str(tmp_path / "o2")])
    again = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert code == 0 and [r["metrics"]["mmhm"] for r in again["results"]] == [r["metrics"]["mmhm"]
                                                                              for r in rep["results"]]
    assert main(["eval", "--model", "builtin:toy2d-flow", "--methods", "dp", "--nfe", "2", "--metric",
                 "wasserstein,bogus", "--out", str(tmp_path / "p")]) == 2
    assert "--metric" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["eval", "--model", "builtin:toy2d-flow", "--methods", "uniform", "--metric", "wasserstein",
                 "--bounds", str(tmp_path / "b.json"), "--out", str(tmp_path / "q")]) == 2
    assert "add mmhm" in capsys.readouterr().err


def test_fid_teacher_is_fid_against_the_teachers_own_samples(toy2d):
    from eval.metrics import fid_from_features
    from schedules.teacher import Teacher, teacher_sample

    rep = run_sweep(toy2d, metric="wasserstein,fid-teacher", methods=["uniform"], nfe=[1, 8], num=300,
                    teacher_steps=10, grid=0, progress=False)
    assert rep["teacher"]["metrics"]["fid-teacher"] == pytest.approx(0.0, abs=1e-6)
    noise = toy2d.noise(300, 10_000)
    ref = teacher_sample(toy2d, noise, Teacher("heun", 10)).x.double()
    got = {r["nfe"]: r["metrics"]["fid-teacher"] for r in rep["results"]}
    x8 = sample(toy2d, noise, uniform(toy2d, 8).sigmas, "euler").double()
    assert got[8] == pytest.approx(fid_from_features(ref, x8), rel=1e-6)
    assert 0 < got[8] < got[1]  # eight Euler steps sit closer to the teacher's distribution than one


def test_fid_teacher_follows_each_guidance_scale():
    from schedules.conditioning import Conditioning

    m = load_model("builtin:digits-cond", conditioning=Conditioning(labels="all", guidance=3.0))
    rep = run_sweep(m, metric="fid,fid-teacher", methods=["uniform"], nfe=[2], num=32, teacher_steps=3, grid=0,
                    guidance=[1.0, 3.0], use_cache=False, progress=False)
    for t in rep["teachers"]:  # each scale's teacher is its own reference
        assert t["metrics"]["fid-teacher"] == pytest.approx(0.0, abs=1e-3)
    assert all(r["metrics"]["fid-teacher"] > 1e-3 for r in rep["results"])
