"""P5 (benchmarks.distill) scoring: FID and KID on digits-features, and their Markdown tables."""

from __future__ import annotations

import pytest
import torch

from benchmarks.distill import Evaluator, markdown


def _row(model: str, table: str, nfe: int, fid: float, kid: float | None = None) -> dict:
    r = {"model": model, "table": table, "nfe": nfe, "fid": fid, "teacher_l2": fid / 100}
    return r if kid is None else {**r, "kid": kid}


def _result(rows: list[dict], **extra) -> dict:
    return {"metric": "fid", "rows": rows, "reference_quality": 20.0, "straightness": {"teacher": 2.0},
            "boss_over_uniform_reflow": {2: 0.5}, "config": {"reference_steps": 50}, **extra}


def test_markdown_adds_a_kid_table_when_every_row_has_kid():
    rows = [_row("teacher", "dp", 2, 80.0, 0.05), _row("reflow", "uniform", 2, 60.0, 0.02),
            _row("boss@2", "dp", 2, 30.0, 0.004)]
    md = markdown(_result(rows, reference_kid=0.001))
    assert "| boss | dp | 30 (0.3) |" in md
    assert "KID (mean" in md and "| boss | dp | 0.004 |" in md and "| reflow | uniform | 0.02 |" in md
    assert "reference sampler KID: 0.001" in md
    assert "BOSS / uniform reflow (KID): NFE 2: 0.200" in md  # 0.004 / 0.02
    assert "NFE 2 student fid / reference sampler fid: reflow 3.00, boss@2 1.50" in md  # 60 / 20, 30 / 20
    # a result without KID (toy2d, or written before KID was scored) renders as before: no KID table
    old = markdown(_result([_row("boss@2", "dp", 2, 30.0)]))
    assert "KID" not in old and "| boss | dp | 30 (0.3) |" in old


def test_evaluator_scores_digits_by_fid_and_kid():
    from schedules.adapters import load_model
    from schedules.embedded.nets import digits_data

    torch.set_num_threads(1)
    ev = Evaluator(load_model("builtin:digits-flow"), n=64, straight_n=4, reference_steps=2, straight_steps=2)
    real = digits_data()[0]
    good = ev.scores(real[torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))[:64]])
    bad = ev.scores(torch.rand(64, *real.shape[1:], generator=torch.Generator().manual_seed(1)) * 2 - 1)
    assert set(good) == {"fid", "kid"} and ev.quality(real[:64]) == pytest.approx(ev.scores(real[:64])["fid"])
    # real digits are far closer to the digit set than uniform noise, by both metrics
    assert good["fid"] < bad["fid"] / 5 and good["kid"] < bad["kid"] / 5
