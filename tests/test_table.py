import json
import os

import pytest
import torch

from schedules import FlowConvention, TimestepTable, VPConvention, load_table
from schedules.io import StepsmithError


def flow_table(sigmas=(1.0, 0.6, 0.3, 0.0), solver="euler", **kw):
    return TimestepTable.from_sigmas(list(sigmas), convention=FlowConvention(1000.0), prediction="flow",
                                     solver=solver, method="test", model="m", **kw)


def test_round_trip(tmp_path):
    t = flow_table(objective=0.5, provenance={"seed": 3})
    p = t.save(tmp_path / "t.json")
    back = load_table(p)
    assert back == t
    assert back.timesteps == pytest.approx([1000.0, 600.0, 300.0])
    d = json.loads(p.read_text())
    assert d["format"] == "stepsmith.schedule/v1" and d["steps"] == 3 and d["nfe"] == 3


def test_nfe_counts_heun_honestly():
    t = flow_table(solver="heun")
    assert t.steps == 3 and t.nfe == 5  # 2K-1: the final jump to 0 is an Euler step


def test_vp_table_integer_timesteps():
    conv = VPConvention.default()
    ts = torch.tensor([999.0, 500.0, 10.0], dtype=torch.float64)
    sig = conv.sigma_from_model_time(ts).tolist() + [0.0]
    t = TimestepTable.from_sigmas(sig, convention=conv, prediction="epsilon", solver="ddim", method="x", model="m")
    assert t.timesteps == [999, 500, 10]
    assert t.convention_config["alphas_cumprod_sha256"] == conv.fingerprint()


@pytest.mark.parametrize("sigmas,match", [
    ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
    ([1.0, 0.3, 0.6, 0.0], "strictly decreasing"),
    ([1.0, 0.5, 0.1], "end in exactly 0"),
    ([1.0], "at least 2"),
    ([80.0, 1.0, 0.0], "VP/EDM"),
    ([1.0, float("nan"), 0.0], "NaN"),
])
def test_validation_names_field_and_fix(sigmas, match):
    with pytest.raises(StepsmithError, match=match):
        flow_table(sigmas)


def test_inconsistent_fields_rejected():
    d = flow_table().to_dict()
    for key, value, match in [("nfe", 7, "nfe"), ("steps", 2, "steps"), ("timesteps", [1000.0, 600.0], "timesteps"),
                              ("solver", "rk45", "solver"), ("prediction", "epsilon", "prediction"),
                              ("timesteps", [1000.0, 1000.0, 300.0], "duplicates")]:
        bad = dict(d, **{key: value})
        with pytest.raises(StepsmithError, match=match):
            TimestepTable.from_dict(bad)


def test_load_errors(tmp_path):
    with pytest.raises(StepsmithError, match="does not exist"):
        load_table(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StepsmithError, match="not valid JSON"):
        load_table(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something/v2"}))
    with pytest.raises(StepsmithError, match="format"):
        load_table(tmp_path / "other.json")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    flow_table().save(path)
    before = path.read_text()

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        flow_table((1.0, 0.2, 0.0)).save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temp file left behind


def test_compatibility_checks():
    t = flow_table()
    t.check_compatible(FlowConvention(1000.0), "flow")
    with pytest.raises(StepsmithError, match="flow model but"):
        t.check_compatible(VPConvention.default())
    conv = VPConvention.default()
    vt = TimestepTable.from_sigmas([conv.sigma_max, 1.0, 0.0], convention=conv, prediction="epsilon",
                                   solver="euler", method="x", model="m")
    other = VPConvention.from_scheduler_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                "beta_end": 0.012, "num_train_timesteps": 1000})
    with pytest.raises(StepsmithError, match="noise schedule"):
        vt.check_compatible(other)
