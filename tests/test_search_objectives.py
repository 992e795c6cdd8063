"""Search objectives: each against a direct formula or eval's implementation, and wired into dp / evolution / CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from schedules.cli import main
from schedules.io import StepsmithError
from schedules.search import make_table, make_tables, objectives
from schedules.search.objectives import (
    OBJECTIVES,
    embedded_features,
    feature_name,
    fid,
    kid,
    make_scorer,
    model_data,
    objective_kind,
    register_data,
    sliced_wasserstein,
    teacher_mse,
)
from schedules.search.toys import gaussian_adapter

torch.set_num_threads(1)


def test_teacher_mse_is_the_mean_squared_difference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert teacher_mse(a, b) == pytest.approx(float(((a - b) ** 2).sum() / 15))


def test_sliced_wasserstein_zero_on_identical_sets_and_shift_in_one_dimension():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g)
    assert sliced_wasserstein(x, x[torch.randperm(200, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    y = torch.randn(300, 1, generator=g)
    assert sliced_wasserstein(y + 0.7, y) == pytest.approx(0.7, rel=1e-6)  # every direction is ±1


def test_sliced_wasserstein_of_shifted_gaussians_matches_the_shift():
    """For a shift v, the projection on θ shifts by θ·v and E(θ·v)² = |v|²/D over the sphere."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 1.5, 0.0, 0.0], dtype=torch.float64)
    got = sliced_wasserstein(x + v, x, slices=4000)
    assert got == pytest.approx(float(v.norm()) / math.sqrt(8), rel=0.05)
    assert sliced_wasserstein(x + 2 * v, x, slices=4000) > 1.9 * got


def test_kid_matches_eval_on_random_features():
    from eval.metrics import kid_from_features

    g = torch.Generator().manual_seed(3)
    a = torch.randn(60, 16, generator=g, dtype=torch.float64)
    b = 0.8 * torch.randn(60, 16, generator=g, dtype=torch.float64) + 0.3
    ref, _ = kid_from_features(a, b, subsets=3, subset_size=60)
    assert kid(b, a) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert kid(b, a) > kid(a[:30], a[30:])


def test_fid_matches_eval_on_random_features():
    from eval.metrics import fid_from_features

    g = torch.Generator().manual_seed(4)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64)
    b = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.5, 2, 8).double()) + 0.2
    assert fid(b, a) == pytest.approx(fid_from_features(a, b), rel=1e-6)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)


def test_embedded_features_are_evals_network():
    from eval.features import digits_features

    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ours = embedded_features("builtin:sharp-features")(x)
    assert ours.shape == (4, 128) and torch.allclose(ours, digits_features("sharp-features")(x), atol=1e-6)


def test_feature_objectives_need_a_feature_network():
    with pytest.raises(StepsmithError, match="`--objective fid` needs a feature network") as e:
        feature_name("fid", "gaussian-flow-0.5", None)
    assert e.value.param == "features"
    assert feature_name("kid", "builtin:sharp-ddpm", None) == "sharp-features"
    assert feature_name("wasserstein", "my-model", None) is None  # pixel space
    with pytest.raises(StepsmithError, match="unknown `objective`"):
        feature_name("lpips", "m", None)
    with pytest.raises(StepsmithError, match="does not use a feature network"):
        feature_name("teacher-mse", "m", "builtin:sharp-features")


def test_scorer_caches_the_teacher_features():
    calls = []

    def feat(x):
        calls.append(x.shape[0])
        return x.reshape(x.shape[0], -1).double()

    t = torch.randn(10, 3, generator=torch.Generator().manual_seed(6))
    score, prov = make_scorer("kid", t, features=feat)
    assert score(t) == pytest.approx(kid(t, t)) and score(t + 1) > score(t)
    score(t)
    assert calls == [10] * 5 and prov == {"objective": "kid", "features": "feat"}


def _feat(x):
    return torch.cat([x, x ** 2], dim=1).double()


def test_dp_with_kid_on_a_tiny_model_gives_a_valid_table_and_records_the_objective():
    ad = gaussian_adapter("flow", 0.5, dim=4)
    t = make_table(ad, "dp", 4, samples=16, grid=20, objective="kid", features=_feat)
    t.validate()
    p = t.provenance
    assert t.nfe == 4 and p["objective"] == "kid" and p["features"] == "_feat"
    assert p["objective_kind"].startswith("kid in _feat features vs heun-20@search-grid") and p["teacher_mse"] >= 0
    base = make_table(ad, "dp", 4, samples=16, grid=20)
    assert base.provenance["objective"] == "teacher-mse" and base.provenance["objective_kind"].startswith("final mse")


def test_dp_objective_is_refused_outside_the_refinement():
    ad = gaussian_adapter("flow", 0.5, dim=4)
    with pytest.raises(StepsmithError, match="needs mode=refined"):
        make_table(ad, "dp", 3, samples=4, grid=10, mode="teacher", objective="wasserstein")
    with pytest.raises(StepsmithError, match="needs a feature network"):
        make_table(ad, "dp", 3, samples=4, grid=10, objective="fid")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_runs_in_dp_and_is_what_the_refinement_minimised(name, monkeypatch):
    ad = gaussian_adapter("flow", 0.5, dim=4)
    feats = None if OBJECTIVES[name].features == "never" else _feat
    if OBJECTIVES[name].reference == "data":  # the toy's data distribution N(0, 0.5² I)
        monkeypatch.setattr(objectives, "_USER_DATA", {})
        register_data(ad.name, 0.5 * torch.randn(256, 4, generator=torch.Generator().manual_seed(7)))
    tabs = make_tables(ad, "dp", [3, 4], samples=24, grid=16, objective=name, features=feats)
    for t in tabs.values():
        assert t.provenance["objective"] == name
        start = t.provenance["start_final_errors"]
        assert t.objective <= min(start.values()) + 1e-12  # coordinate descent never gets worse


def test_evolution_takes_an_objective():
    ad = gaussian_adapter("flow", 0.5, dim=4)
    t = make_table(ad, "evolution", 3, samples=8, grid=12, population=4, generations=2, elite=2,
                   objective="wasserstein")
    assert t.provenance["objective"] == "wasserstein" and t.provenance["features"] is None
    assert t.provenance["objective_kind"].startswith("sliced wasserstein vs")
    with pytest.raises(StepsmithError, match="needs a feature network"):
        make_table(ad, "evolution", 3, samples=8, grid=12, population=4, generations=2, elite=2, objective="kid")


def test_cli_objective(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc = main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--objective", "fid", "--no-progress",
               "--out", str(out)])
    assert rc == 2 and "`--objective fid` needs a feature network" in capsys.readouterr().err and not out.exists()
    rc = main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--objective", "wasserstein", "--samples", "8",
               "--grid", "12", "--no-progress", "--out", str(out)])
    assert rc == 0
    capsys.readouterr()
    prov = json.loads(out.read_text())["provenance"]
    assert prov["objective"] == "wasserstein" and "--objective wasserstein" in prov["command"]
    rc = main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--features", "builtin:sharp-features",
               "--no-progress", "--out", str(tmp_path / "u.json")])
    assert rc == 2 and "give --objective too" in capsys.readouterr().err


def test_auto_objective_is_feature_mse_where_a_feature_network_is_known():
    from schedules.search.objectives import resolve_objective

    assert resolve_objective(None, "builtin:sharp-ddpm") == "feature-mse"
    assert resolve_objective("auto", "builtin:digits-flow") == "feature-mse"
    assert resolve_objective("auto", "builtin:toy2d-flow") == "teacher-mse"
    assert resolve_objective("auto", "my_model.py:net", features=_feat) == "feature-mse"
    assert resolve_objective("kid", "builtin:toy2d-flow") == "kid"
    with pytest.raises(StepsmithError, match="use auto or one of"):
        resolve_objective("lpips", "builtin:digits-flow")
    ad = gaussian_adapter("flow", 0.5, dim=4)
    t = make_table(ad, "dp", 3, samples=8, grid=12, features=_feat)  # no objective: auto
    assert t.provenance["objective"] == "feature-mse" and t.provenance["features"] == "_feat"
    e = make_table(ad, "evolution", 3, samples=8, grid=12, population=4, generations=1, elite=2)
    assert e.provenance["objective"] == "teacher-mse"
    v = make_table(ad, "dp", 3, samples=8, grid=12, mode="teacher")  # no refinement: no objective
    assert v.provenance["objective_kind"].startswith("dp path cost")
    with pytest.raises(StepsmithError, match="drop `features`"):  # features where nothing uses them: refused
        make_table(ad, "dp", 3, samples=8, grid=12, features=_feat, mode="teacher")


# ---- data objectives: against real data instead of the teacher's samples


def test_sliced_wasserstein_of_unequal_sets_uses_quantiles():
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    assert sliced_wasserstein(a, torch.cat([b, b])) == pytest.approx(sliced_wasserstein(a, b), rel=1e-12)
    big = torch.randn(4000, 3, generator=g)
    assert sliced_wasserstein(big[:200], big) < 0.5 * sliced_wasserstein(big[:200] + 0.5, big)
    with pytest.raises(StepsmithError, match="equal dimension"):
        sliced_wasserstein(a, torch.randn(40, 2))


def test_data_kid_of_the_data_is_near_zero_and_grows_with_a_shift():
    real = model_data("builtin:digits-flow")[0]
    score, prov = make_scorer("data-kid", real[:64], model_name="builtin:digits-flow")
    assert prov["features"] == "digits-features" and prov["data"].startswith("digits_data()")
    same = score(real[torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(9))[:600]])
    small, large = score((real[:600] + 0.3).clamp(-1, 1)), score((real[:600] + 0.8).clamp(-1, 1))
    assert abs(same) < 0.1 * small and small < large
    fscore, _ = make_scorer("data-fid", real[:64], model_name="builtin:digits-flow")
    assert fscore(real[:300]) < fscore((real[:300] + 0.5).clamp(-1, 1))


def test_data_objective_ignores_the_teacher_target():
    real = model_data("builtin:sharp-ddpm")[0]
    noise = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(10)) * 2 - 1
    a, _ = make_scorer("data-kid", real[:32], model_name="builtin:sharp-ddpm")
    b, _ = make_scorer("data-kid", noise, model_name="builtin:sharp-ddpm")
    assert a(real[100:132]) == pytest.approx(b(real[100:132]), rel=1e-12)
    t, _ = make_scorer("kid", noise, model_name="builtin:sharp-ddpm")  # the teacher version does not
    assert t(real[100:132]) > 10 * abs(a(real[100:132]))


def test_data_wasserstein_on_toy2d_is_in_pixel_space_against_fresh_moons():
    from schedules.embedded.nets import toy2d_data

    score, prov = make_scorer("data-wasserstein", torch.zeros(64, 2), model_name="builtin:toy2d-flow")
    assert prov["features"] is None and "toy2d_data" in prov["data"]
    fresh = toy2d_data(256, seed=5)
    assert score(fresh) < 0.5 * score(fresh * 0.5) and score(fresh) < 0.5 * score(fresh + 0.5)


def test_class_guard_rejects_a_candidate_with_the_wrong_classes():
    real, labels = __import__("schedules.embedded.nets", fromlist=["digits_data"]).digits_data()
    order = labels.argsort()
    teacher = real[order[::18]][:96]  # ~10 of each class, sorted by class
    wrong = teacher.roll(48, dims=0)  # the same images, each paired with a sample of another class
    guarded, prov = make_scorer("data-kid", teacher, model_name="builtin:digits-cond")
    plain, pprov = make_scorer("data-kid", teacher, model_name="builtin:digits-cond", class_guard_margin=None)
    assert prov["class_guard"] == objectives.CLASS_GUARD_MARGIN and "class_guard" not in pprov
    assert guarded(teacher) == plain(teacher)  # right classes: not rejected
    assert plain(wrong) == pytest.approx(plain(teacher), rel=1e-9)  # same set: kid cannot tell
    assert guarded(wrong) > objectives.GUARD_PENALTY * 0.5  # the guard can
    few = torch.cat([wrong[:3], teacher[3:]])  # 3 of 96 off: agreement ≥ 0.95 is kept, 20 off is rejected
    many = torch.cat([wrong[:20], teacher[20:]])
    assert guarded(few) == plain(few) and guarded(many) > objectives.GUARD_PENALTY * 0.1
    loose, _ = make_scorer("data-kid", teacher, model_name="builtin:digits-cond", class_guard_margin=0.3)
    assert loose(many) == plain(many)
    nog, nprov = make_scorer("data-kid", teacher, model_name="builtin:digits-flow")  # unconditional: no guard
    assert "class_guard" not in nprov
    with pytest.raises(StepsmithError, match="classifier head"):
        make_scorer("data-kid", teacher, features=_feat, data=real, class_guard_margin=0.1)


def test_data_objective_refused_without_data_and_accepts_given_or_registered_data(monkeypatch):
    monkeypatch.setattr(objectives, "_USER_DATA", {})
    with pytest.raises(StepsmithError, match="none is known for my-model: pass --data PATH") as e:
        feature_name("data-kid", "my-model", _feat)
    assert e.value.param == "data"
    with pytest.raises(StepsmithError, match="none is known"):
        make_scorer("data-wasserstein", torch.zeros(8, 2), model_name="my-model")
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(11))
    score, prov = make_scorer("data-wasserstein", torch.zeros(8, 2), model_name="my-model", data=data)
    assert prov["data"] == "given data [50]" and score(data) == pytest.approx(0.0, abs=1e-12)
    register_data("my-model", data)
    assert feature_name("data-wasserstein", "my-model", None) is None
    assert objective_kind("data-kid", "digits-features", "heun") == "kid in digits-features features vs real data (search samples)"
    with pytest.raises(StepsmithError, match="N ≥ 2"):
        register_data("my-model", torch.zeros(1, 2))


def test_dp_with_a_data_objective_records_the_data(monkeypatch):
    monkeypatch.setattr(objectives, "_USER_DATA", {})
    ad = gaussian_adapter("flow", 0.5, dim=4)
    register_data(ad.name, 0.5 * torch.randn(128, 4, generator=torch.Generator().manual_seed(12)))
    t = make_table(ad, "dp", 4, samples=16, grid=20, objective="data-wasserstein")
    p = t.provenance
    assert p["objective"] == "data-wasserstein" and p["data"] == "registered data [128]"
    assert p["objective_kind"] == "sliced wasserstein vs real data (search samples)" and p["teacher_mse"] >= 0


def test_cli_data_objective_with_given_data(tmp_path, capsys, monkeypatch):
    from schedules.embedded.nets import toy2d_data
    from schedules.io import save_safetensors

    monkeypatch.setattr(objectives, "_USER_DATA", {})
    data = tmp_path / "moons.safetensors"
    save_safetensors(data, {"x": toy2d_data(300, seed=3)})
    out = tmp_path / "t.json"
    rc = main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--data", str(data), "--no-progress",
               "--out", str(out)])
    assert rc == 2 and "or --objective data-kid" in capsys.readouterr().err and not out.exists()
    rc = main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--objective", "data-wasserstein", "--data",
               str(data), "--samples", "301", "--no-progress", "--out", str(out)])  # fewer real samples than search samples
    err = capsys.readouterr().err
    assert rc == 2 and "holds 300 samples but a data objective on the search samples asks for 301" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    rc = main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--objective", "data-wasserstein", "--data",
               str(data), "--samples", "8", "--grid", "12", "--no-progress", "--out", str(out)])
    assert rc == 0
    capsys.readouterr()
    prov = json.loads(out.read_text())["provenance"]
    assert prov["objective"] == "data-wasserstein" and prov["data"] == "registered data [300]"


def test_evolution_with_a_data_objective(monkeypatch):
    monkeypatch.setattr(objectives, "_USER_DATA", {})
    ad = gaussian_adapter("flow", 0.5, dim=4)
    with pytest.raises(StepsmithError, match="none is known"):
        make_table(ad, "evolution", 3, samples=8, grid=12, population=4, generations=1, elite=2, objective="data-kid",
                   features=_feat)
    register_data(ad.name, 0.5 * torch.randn(64, 4, generator=torch.Generator().manual_seed(13)))
    t = make_table(ad, "evolution", 3, samples=8, grid=12, population=4, generations=2, elite=2, objective="data-kid",
                   features=_feat)
    assert t.provenance["objective"] == "data-kid" and t.provenance["data"] == "registered data [64]"
    assert t.provenance["objective_kind"] == "kid in _feat features vs real data (search samples)"
