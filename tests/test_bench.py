"""Pure parts of the benchmark script (the script itself runs reduced in .ci/run)."""

from __future__ import annotations

import pytest

from eval.bench import PeakRSS, markdown, teacher_gap


def _report():
    rows = [{"label": lab, "nfe": n, "value": v, "extra": {}} for lab, n, v in [
        ("uniform", 4, 10.0), ("dp", 4, 4.0), ("karras", 4, 12.0),
        ("uniform", 8, 6.0), ("dp", 8, 6.5), ("karras", 8, 5.0)]]
    return {"metric": "fid", "nfe": [4, 8], "results": rows, "teacher": {"value": 2.0, "nfe": 39, "extra": {}},
            "model": "m"}


def test_teacher_gap_fraction_and_best_label():
    g = teacher_gap({"report": _report()})
    assert g[4]["closed"] == pytest.approx((10 - 4) / (10 - 2)) and g[4]["best_label"] == "dp"
    assert g[8]["closed"] == pytest.approx((6 - 5) / (6 - 2)) and g[8]["best_label"] == "karras"


def test_peak_rss_sees_an_allocation():
    import numpy as np

    with PeakRSS(interval=0.001) as mem:
        a = np.ones(40 * 2**20 // 8)  # 40 MB, touched
        a.sum()
        import time

        time.sleep(0.05)
        del a
    assert mem.peak_mb is None or mem.peak_mb > 20


def test_markdown_marks_best_and_ratios(tmp_path):
    res = {"name": "m-euler", "model": "m", "solver": "euler", "report": _report(), "costs": [], "skipped_baselines": {}}
    result = {"out": str(tmp_path), "command": "stepsmith bench", "date": "d", "seconds": 1.0, "reduced": False,
              "machine": {"platform": "p", "cpus": 2, "threads": 1, "versions": {"torch": "x"}},
              "config": {"search_samples": 8, "num": 10, "teacher_steps": 5, "parts": ["p1", "p2", "p3"], "nfe": [4, 8]},
              "quality": [res]}
    md = markdown(result, tmp_path)
    assert "| *dp* | **4** | 6.5 |" in md
    assert "| karras | 12 | **5** |" in md
    # best searched (dp) ÷ best baseline (uniform 10 at NFE 4, karras 5 at NFE 8)
    assert "| best searched ÷ best baseline | 0.4 | 1.3 |" in md
    assert "75% (dp)" in md and "25% (karras)" in md
