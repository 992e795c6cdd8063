"""Trust tests for eval.mmhm: the aggregate on a hand-computed example, frozen bounds, bad files."""

import json

import pytest

from eval.mmhm import EPS, Bounds, metric_direction, mmhm
from schedules.io import StepsmithError

ROWS = [
    {"label": "a", "fid": 10.0, "is": 2.0},
    {"label": "b", "fid": 30.0, "is": 4.0},
    {"label": "c", "fid": 20.0, "is": 3.0},
]


def test_directions():
    for name in ("fid", "KID", "wasserstein", "teacher-mse", "teacher_mse", "mmd", "energy"):
        assert metric_direction(name) == "lower"
    for name in ("precision", "recall", "density", "coverage", "is", "class-accuracy", "class_accuracy", "clip",
                 "teacher_psnr"):
        assert metric_direction(name) == "higher"
    with pytest.raises(StepsmithError, match="kid_std"):
        metric_direction("kid_std")


def test_hand_computed_example():
    # u_fid = (30 - v)/20: a 1, b 0, c .5;  u_is = (v - 2)/2: a 0, b 1, c .5
    scores = mmhm(ROWS, ["fid", "is"])
    edge = 2 / (1 / (1 + EPS) + 1 / EPS)
    assert scores == pytest.approx([edge, edge, 2 / (2 / (0.5 + EPS))], rel=1e-12)
    assert scores[2] == pytest.approx(0.501)
    assert scores.metrics == ("fid", "is") and scores.eps == EPS
    assert scores.bounds.ranges == {"fid": (10.0, 30.0), "is": (2.0, 4.0)}
    d = scores.as_dict()
    assert d["metrics"] == ["fid", "is"] and d["scores"] == list(scores)
    assert d["bounds"]["fid"] == {"direction": "lower", "min": 10.0, "max": 30.0}


def test_single_metric_and_equal_bounds():
    assert mmhm(ROWS, ["fid"]) == pytest.approx([1 + EPS, EPS, 0.5 + EPS])
    same = [{"fid": 5.0, "recall": 0.2}, {"fid": 5.0, "recall": 0.6}]
    # fid does not separate the rows: u = 1 for both
    assert mmhm(same, ["fid", "recall"]) == pytest.approx([2 / (1 / (1 + EPS) + 1 / EPS), 1 + EPS])


def test_frozen_bounds_are_reused_and_clipped(tmp_path):
    bounds = Bounds.from_rows(ROWS, ["fid", "is"])
    path = tmp_path / "sub" / "bounds.json"
    bounds.save(path)
    loaded = Bounds.load(path)
    assert loaded == bounds
    assert json.loads(path.read_text())["format"] == "stepsmith.mmhm-bounds/v1"
    new = [{"fid": 20.0, "is": 3.0}, {"fid": 5.0, "is": 9.0}, {"fid": 50.0, "is": 0.0}]
    scores = mmhm(new, ["fid", "is"], bounds=loaded)
    # the first row scores as row c of the pool did; the others are clipped to u = 1 and u = 0
    assert scores == pytest.approx([0.5 + EPS, 1 + EPS, EPS])
    assert mmhm(new, ["is"], bounds=loaded).bounds.metrics == ("is",)
    with pytest.raises(StepsmithError, match="no range for kid"):
        mmhm(new, ["fid", "kid"], bounds=loaded)


def test_bad_rows_and_metrics():
    with pytest.raises(StepsmithError, match="row 1 has no value for metric 'is'"):
        mmhm([{"fid": 1.0, "is": 1.0}, {"fid": 2.0}], ["fid", "is"])
    with pytest.raises(StepsmithError, match="finite"):
        mmhm([{"fid": float("nan")}], ["fid"])
    with pytest.raises(StepsmithError, match="number"):
        mmhm([{"fid": "12"}], ["fid"])
    with pytest.raises(StepsmithError, match="at least one metric"):
        mmhm(ROWS, [])
    with pytest.raises(StepsmithError, match="repeat"):
        mmhm(ROWS, ["fid", "fid"])
    with pytest.raises(StepsmithError, match="at least one row"):
        mmhm([], ["fid"])
    with pytest.raises(StepsmithError, match="better low or high"):
        mmhm(ROWS, ["label"])


@pytest.mark.parametrize("content,match", [
    ("not json", "cannot read"),
    ("[]", "not an MMHM bounds file"),
    ('{"format": "other", "metrics": {}}', "not an MMHM bounds file"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {}}', "non-empty"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"fid": [1, 2]}}', "min.*max"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"fid": {"min": "1", "max": 2}}}', "fid.min must be a number"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"fid": {"min": true, "max": 2}}}', "number"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"fid": {"min": 3, "max": 2}}}', "min 3.0 > max 2.0"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"fid": {"min": 1, "max": NaN}}}', "finite"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"fid": {"min": 1, "max": 2, "direction": "higher"}}}',
     "lower-better"),
    ('{"format": "stepsmith.mmhm-bounds/v1", "metrics": {"nope": {"min": 1, "max": 2}}}', "better low or high"),
])
def test_bad_bounds_file_is_rejected(tmp_path, content, match):
    path = tmp_path / "bounds.json"
    path.write_text(content)
    with pytest.raises(StepsmithError, match=match):
        Bounds.load(path)


def test_missing_bounds_file(tmp_path):
    with pytest.raises(StepsmithError, match="does not exist"):
        Bounds.load(tmp_path / "none.json")
