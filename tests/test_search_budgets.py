"""All budgets from one search: ``make_tables`` and ``stepsmith search --nfe 4,6,8 --out DIR``."""

from __future__ import annotations

import json

import pytest

from schedules.io import StepsmithError
from schedules.search import make_table, make_tables
from schedules.search.toys import gaussian_adapter


@pytest.mark.parametrize("mode,solver", [("teacher", "euler"), ("teacher", "dpmpp-2m"), ("refined", "ddim"),
                                         ("student", "euler")])
def test_one_pass_tables_equal_single_budget_searches(mode, solver):
    ad = gaussian_adapter("vp", 0.4, mean=0.3, dim=3)
    opts = {"samples": 6, "grid": 16, "mode": mode}
    c0 = ad.calls
    many = make_tables(ad, "dp", [3, 4, 6], solver, **opts)
    calls_many = ad.calls - c0
    assert sorted(many) == [3, 4, 6]
    single_calls = 0
    for nfe, t in many.items():
        c0 = ad.calls
        one = make_table(ad, "dp", nfe, solver, **opts)
        single_calls += ad.calls - c0
        assert t.sigmas == one.sigmas and t.objective == one.objective and t.nfe == nfe
        sp = t.provenance["shared_pass"]
        assert sp["shared"] is True and sp["nfe"] == [3, 4, 6]
        assert sp["model_calls"] == one.provenance["reference_calls"] + (
            0 if mode == "teacher" else sp["model_calls"] - one.provenance["reference_calls"])
    shared = many[3].provenance["shared_pass"]["model_calls"]
    own = sum(t.provenance["model_calls"] for t in many.values())
    assert calls_many == shared + own  # the shared pass counted once
    if mode == "teacher":
        assert own == 0 and calls_many == many[3].provenance["reference_calls"]  # the reference pass ran once
        assert single_calls == 3 * calls_many


def test_variants_and_other_methods_give_every_budget():
    ad = gaussian_adapter("flow", 0.4, mean=0.3, dim=3)
    boss = make_tables(ad, "dp", [2, 4], "euler", samples=4, variant="boss", grid=20)
    for nfe, t in boss.items():
        assert t.provenance["path"] == make_table(ad, "dp", nfe, samples=4, variant="boss", grid=20).provenance["path"]
    base = make_tables(ad, "karras", [3, 5])
    assert [t.steps for t in base.values()] == [3, 5] and "shared_pass" not in base[3].provenance
    with pytest.raises(StepsmithError, match="nfe"):
        make_tables(ad, "dp", [])


def test_cli_writes_one_table_per_budget_atomically(tmp_path, capsys):
    from schedules.cli import main
    from schedules.table import load_table

    out = tmp_path / "tables"
    args = ["search", "--model", "builtin:toy2d-flow", "--nfe", "3,4", "--samples", "4", "--grid", "12",
            "--option", "mode=teacher", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dp-nfe3.json", "dp-nfe4.json"]
    t = load_table(out / "dp-nfe4.json")
    assert t.steps == 4 and t.model == "builtin:toy2d-flow" and t.provenance["shared_pass"]["shared"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tables"][0].endswith("dp-nfe3.json")
    (out / "mine.txt").write_text("keep")
    assert main(args) == 2 and (out / "mine.txt").exists()  # refused: nothing replaced
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dp-nfe3.json", "dp-nfe4.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    bad = tmp_path / "bad"
    assert main(["search", "--model", "builtin:toy2d-flow", "--nfe", "3,x", "--out", str(bad)]) == 2
    assert not bad.exists()
