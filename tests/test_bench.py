"""Pure parts of the benchmarks (the suite itself runs reduced in .ci/run)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from benchmarks.distill import DistillBenchConfig, boss_over_uniform_reflow, build_parser, cli_command
from benchmarks.options import argv_for, config_from_args, config_from_dict
from benchmarks.overhead import OverheadConfig
from benchmarks.report import markdown, teacher_gap
from benchmarks.suite import COMMITTED, FULL, REDUCED, PeakRSS, _run_dir

ROOT = Path(__file__).resolve().parents[1]


def _report():
    rows = [{"label": lab, "method": lab, "nfe": n, "value": v, "extra": {}} for lab, n, v in [
        ("uniform", 4, 10.0), ("dp", 4, 4.0), ("karras", 4, 12.0),
        ("uniform", 8, 6.0), ("dp", 8, 6.5), ("karras", 8, 5.0)]]
    return {"metric": "fid", "nfe": [4, 8], "results": rows, "teacher": {"value": 2.0, "nfe": 39, "extra": {}},
            "model": "m"}


def _p1_result(tmp_path, rep) -> dict:
    """A P1-only suite result of one config ("m-euler") whose sweep report is ``rep``."""
    res = {"name": "m-euler", "model": "m", "solver": "euler", "report": rep, "costs": [], "skipped_baselines": {}}
    return {"out": str(tmp_path), "command": "stepsmith bench", "date": "d", "seconds": 1.0, "reduced": False,
            "machine": {"platform": "p", "cpus": 2, "threads": 1, "versions": {"torch": "x"}},
            "config": {"search_samples": 8, "num": 10, "teacher_steps": 5, "parts": ["p1"], "nfe": [4, 8]},
            "quality": [res]}


def test_teacher_gap_fraction_and_best_label():
    g = teacher_gap({"report": _report()})
    assert g[4]["closed"] == pytest.approx((10 - 4) / (10 - 2)) and g[4]["best_label"] == "dp"
    assert g[8]["closed"] == pytest.approx((6 - 5) / (6 - 2)) and g[8]["best_label"] == "karras"


def test_one_table_in_two_rows_ties_and_the_first_row_is_named(tmp_path):
    # the same table scored by two processes differs in the last digits: a tie (both bold), not a win for the later row
    rep = _mmhm_report()
    twin = {**next(r for r in rep["results"] if r["label"] == "dp" and r["nfe"] == 4), "label": "dp-max-cost"}
    twin["value"] *= 1 - 1e-9
    twin["metrics"] = {**twin["metrics"], "fid": twin["value"], "mmhm": 0.9 * (1 + 1e-9)}
    rep["results"].append(twin)
    assert teacher_gap({"report": rep})[4]["best_label"] == "dp"
    result = _p1_result(tmp_path, rep)
    md = markdown(result, tmp_path)
    assert "| *dp* | **4** | 6.5 |" in md and "| *dp-max-cost* | **4** | – |" in md
    assert "| best by fid | dp | karras |" in md  # ranked from the rows: dp ties its twin and comes first
    assert "| best by MMHM | dp-teacher-mse | karras |" in md  # 0.9 ties 0.9·(1 + 1e-9): the earlier row
    assert "| *dp-teacher-mse* | **0.900 (0.50 / 0.25)** | – |" in md and "| *dp-max-cost* | **0.900" in md
    assert "| dp ÷ dp-max-cost | 1 | – |" in md


def test_peak_rss_sees_an_allocation():
    import mmap
    import time

    # A fresh anonymous mapping, touched page by page: new resident memory whatever the allocator holds from
    # earlier tests (a freed numpy/torch buffer can be reused without the RSS growing).
    with PeakRSS(interval=0.001) as mem:
        buf = mmap.mmap(-1, 64 * 2**20)
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        time.sleep(0.05)
        buf.close()
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


def test_committed_benchmarks_md_renders_from_committed_bench_json():
    """``stepsmith bench --render`` rewrites BENCHMARKS.md byte for byte from the committed run."""
    result = json.loads(COMMITTED.read_text())
    assert _run_dir(COMMITTED.parent, Path(result["out"])) == ROOT and result["markdown"] == "BENCHMARKS.md"
    md = markdown({**result, "out": str(COMMITTED.parent)}, ROOT)
    assert md == (ROOT / "BENCHMARKS.md").read_text()


def _committed_commands() -> list[str]:
    bench = json.loads(COMMITTED.read_text())
    folder = COMMITTED.parent
    files = [folder / "p5" / "distill.json", *sorted(folder.glob("p1/*/report.json"))]
    return [bench["command"], bench["distill"]["command"], *(json.loads(f.read_text())["command"] for f in files)]


def test_every_committed_command_is_a_stepsmith_command_line():
    from schedules.cli import build_parser as stepsmith_parser

    for command in _committed_commands():
        argv = shlex.split(command)
        assert argv[0] == "stepsmith", command
        args = stepsmith_parser().parse_args(argv[1:])
        # the merged run and the parallel runs it merged (each with its own benchmarks/results/bench-* folder)
        assert args.command == "bench" and args.out.startswith("benchmarks/results/bench"), command


@pytest.mark.parametrize("preset", [FULL, REDUCED], ids=["full", "reduced"])
def test_distill_command_line_rebuilds_the_config(preset):
    cfg = preset.distill
    argv = shlex.split(cli_command(cfg, "--out", "d.json"))
    assert argv[:3] == ["python", "-m", "benchmarks.distill"]
    assert config_from_args(DistillBenchConfig, build_parser().parse_args(argv[3:])) == cfg


def test_config_round_trips_through_json_and_flags():
    from dataclasses import asdict

    cfg = DistillBenchConfig(nfe=(1, 3), methods=("boss",), table_options={"grid": 8}, lr=5e-4)
    assert config_from_dict(DistillBenchConfig, json.loads(json.dumps(asdict(cfg)))) == cfg
    assert argv_for(cfg) == ["--nfe", "1", "3", "--methods", "boss", "--table-options", '{"grid": 8}', "--lr", "0.0005"]
    assert argv_for(DistillBenchConfig()) == [] and argv_for(OverheadConfig(nfe=2)) == ["--nfe", "2"]


def test_boss_over_uniform_reflow_ratio():
    rows = [{"model": "reflow", "table": "uniform", "nfe": 2, "w2": 0.5}, {"model": "reflow", "table": "dp", "nfe": 2, "w2": 9},
            {"model": "boss@2", "table": "dp", "nfe": 2, "w2": 0.4}, {"model": "boss@4", "table": "dp", "nfe": 4, "w2": 1}]
    assert boss_over_uniform_reflow(rows, (2, 4), "w2") == {2: pytest.approx(0.8)}


def _mmhm_report():
    rep = _report()
    rows = rep["results"]
    rows.append({"label": "dp-teacher-mse", "method": "dp", "nfe": 4, "value": 5.0, "extra": {},
                 "sigmas": [1.0, 0.6, 0.0], "timesteps": [1.0, 0.6]})
    mm = {("uniform", 4): 0.2, ("dp", 4): 0.5, ("karras", 4): 0.1, ("dp-teacher-mse", 4): 0.9,
          ("uniform", 8): 0.3, ("dp", 8): 0.4, ("karras", 8): 0.8}
    for r in rows:
        r["metrics"] = {"fid": r["value"], "precision": 0.5, "recall": 0.25, "mmhm": mm[(r["label"], r["nfe"])]}
    rep["mmhm"] = {"metrics": ["fid", "precision", "recall"], "agreement": [
        {"nfe": 4, "best_fid": "dp", "best_mmhm": "dp-teacher-mse", "agree": False, "spearman": 0.4},
        {"nfe": 8, "best_fid": "karras", "best_mmhm": "karras", "agree": True, "spearman": 1.0}]}
    return rep


def test_markdown_fid_to_teacher_table_where_measured(tmp_path):
    rep = _report()
    ft = {("uniform", 4): 30.0, ("dp", 4): 6.0, ("karras", 4): 40.0, ("uniform", 8): 9.0, ("dp", 8): 3.0, ("karras", 8): 12.0}
    for r in rep["results"]:
        r["metrics"] = {"fid": r["value"], "fid-teacher": ft[(r["label"], r["nfe"])]}
    result = _p1_result(tmp_path, rep)
    md = markdown(result, tmp_path)
    assert "FID to the teacher" in md and "| *dp* | **6** | **3** |" in md and "| uniform | 30 | 9 |" in md
    assert "| best searched ÷ best baseline | 0.2 | 0.333 |" in md  # 6 / 30, 3 / 9
    for r in rep["results"]:
        del r["metrics"]
    assert "FID to the teacher" not in markdown(result, tmp_path)


def test_markdown_mmhm_table_ratio_rows_and_final_jumps(tmp_path):
    result = _p1_result(tmp_path, _mmhm_report())
    md = markdown(result, tmp_path)
    assert "| *dp-teacher-mse* | **0.900 (0.50 / 0.25)** | – |" in md  # a searched row (method dp), best MMHM
    assert "| karras | 0.100 (0.50 / 0.25) | **0.800 (0.50 / 0.25)** |" in md
    assert "| dp ÷ dp-teacher-mse | 0.8 | – |" in md  # 4 / 5
    assert "differ at NFE 4." in md and "| best by MMHM | dp-teacher-mse | karras |" in md
    assert "| dp-teacher-mse | 0.6 (0.60) | – |" in md  # last σ and t_last / t_first


def test_merge_combines_configs_of_parallel_runs_in_preset_order(tmp_path):
    from benchmarks.suite import merge

    def run(folder, names, **more):
        folder.mkdir()
        (folder / "p1" / names[0]).mkdir(parents=True)
        (folder / "p1" / names[0] / "report.json").write_text("{}")
        q = [{"name": n, "model": "m", "solver": "euler", "report": _report(), "costs": [], "skipped_baselines": {}}
             for n in names]
        r = {"format": "stepsmith.bench/v1", "command": "stepsmith bench --only " + ",".join(names), "date": "d",
             "seconds": 10.0 * len(names), "reduced": False, "out": str(folder), "markdown": "x.md",
             "machine": {"platform": "p", "cpus": 2, "threads": 1, "versions": {}},
             "config": {"search_samples": 8, "num": 10, "teacher_steps": 5, "parts": ["p1", "p2", "p3"], "nfe": [4, 8],
                        "only": names}, "quality": q, **more}
        (folder / "bench.json").write_text(json.dumps(r))
        return folder / "bench.json"

    a = run(tmp_path / "a", ["sharp-ddpm-ddim"])
    b = run(tmp_path / "b", ["toy2d-flow-euler", "digits-flow-euler"])
    res = merge([a, b], tmp_path / "out", tmp_path / "out" / "B.md")
    assert [q["name"] for q in res["quality"]] == ["toy2d-flow-euler", "digits-flow-euler", "sharp-ddpm-ddim"]
    assert res["seconds"] == 20.0 and len(res["runs"]) == 2
    assert (tmp_path / "out" / "p1" / "sharp-ddpm-ddim" / "report.json").exists()
    assert (tmp_path / "out" / "B.md").read_text().count("### ") == 3
    from schedules.io import StepsmithError

    with pytest.raises(StepsmithError, match="measured twice"):
        merge([a, a], tmp_path / "out2")


def _config(rows, teacher=2.0, command="stepsmith bench --only m-euler", costs=()):
    rep = {"metric": "fid", "metrics": ["fid", "precision", "mmhm"], "num": 10, "eval_seed": 10000, "nfe": [4],
           "teacher": {"value": teacher, "nfe": 39, "extra": {}}, "model": "m", "command": command,
           "results": [{"label": lab, "method": lab, "nfe": 4, "value": v, "extra": {},
                        "metrics": {"fid": v, "precision": p}} for lab, v, p in rows]}
    return {"name": "m-euler", "model": "m", "solver": "euler", "report": rep, "skipped_baselines": {},
            "costs": [{"method": lab, "nfe": 4, "seconds": 1.0} for lab in costs]}


def test_splice_rows_replaces_only_the_remeasured_rows_and_recomputes_mmhm():
    from benchmarks.suite import splice_rows

    base = _config([("dp", 8.0, 0.5), ("ays", 9.0, 0.4), ("uniform", 10.0, 0.3)], costs=("dp", "ays"))
    new = _config([("ays", 4.0, 0.9)], command="stepsmith bench --only m-euler --rows ays", costs=("ays",))
    new["costs"][0]["seconds"] = 7.0
    out = splice_rows(base, new, ["ays"], None)
    rows = {r["label"]: r for r in out["report"]["results"]}
    assert [r["label"] for r in out["report"]["results"]] == ["dp", "ays", "uniform"]  # searched order, then baselines
    assert rows["ays"]["value"] == 4.0 and rows["dp"]["value"] == 8.0 and rows["uniform"]["value"] == 10.0
    # ays is now best on both metrics: MMHM (bounds over the spliced rows) ranks it first
    assert rows["ays"]["metrics"]["mmhm"] > rows["dp"]["metrics"]["mmhm"] > rows["uniform"]["metrics"]["mmhm"]
    assert out["report"]["spliced"]["rows"] == ["ays"] and out["report"]["teacher"]["value"] == 2.0
    assert {c["method"]: c["seconds"] for c in out["costs"]} == {"dp": 1.0, "ays": 7.0}
    from schedules.io import StepsmithError

    with pytest.raises(StepsmithError, match="teacher scores"):  # an evaluation that does not reproduce the base's
        splice_rows(base, _config([("ays", 4.0, 0.9)], teacher=2.5), ["ays"], None)
    other = _config([("ays", 4.0, 0.9)])
    other["report"]["num"] = 20
    with pytest.raises(StepsmithError, match="num"):
        splice_rows(base, other, ["ays"], None)


def test_merge_lets_a_rows_run_replace_its_config(tmp_path):
    from benchmarks.suite import merge, splice_rows

    def write(folder, quality, command, rows=()):
        folder.mkdir()
        r = {"format": "stepsmith.bench/v1", "command": command, "date": "d", "seconds": 5.0, "reduced": False,
             "out": str(folder), "markdown": "x.md", "machine": {"platform": "p", "cpus": 2, "threads": 1, "versions": {}},
             "config": {"search_samples": 8, "num": 10, "teacher_steps": 5, "parts": ["p1"], "nfe": [4], "only": [],
                        "rows": list(rows)}, "quality": quality}
        (folder / "bench.json").write_text(json.dumps(r))
        return folder / "bench.json"

    base = _config([("dp", 8.0, 0.5), ("uniform", 10.0, 0.3)], costs=("dp",))
    a = write(tmp_path / "a", [base], "stepsmith bench --only m-euler")
    spliced = splice_rows(base, _config([("dp", 3.0, 0.9)]), ["dp"], str(a))
    b = write(tmp_path / "b", [spliced], "stepsmith bench --only m-euler --rows dp", rows=("dp",))
    res = merge([a, b], tmp_path / "out")
    assert [r["value"] for r in res["quality"][0]["report"]["results"]] == [3.0, 10.0]
    assert res["runs"][1]["rows"] == ["dp"]
    from schedules.io import StepsmithError

    with pytest.raises(StepsmithError, match="measured twice"):
        merge([b, a], tmp_path / "out2")  # a full run cannot replace a config silently
    merged = write(tmp_path / "m", [base], "stepsmith bench --merge")
    data = json.loads(merged.read_text())
    data["runs"] = [{"command": "stepsmith bench --only m-euler", "date": "d", "seconds": 5.0, "configs": ["m-euler"]}]
    merged.write_text(json.dumps(data))
    full = write(tmp_path / "f", [_config([("dp", 2.0, 0.9), ("uniform", 10.0, 0.3)])], "stepsmith bench --only m-euler")
    res = merge([merged, full], tmp_path / "out3")  # an earlier merged result given first is updated by a full run
    assert [r["value"] for r in res["quality"][0]["report"]["results"]] == [2.0, 10.0] and len(res["runs"]) == 2


def test_p3_puts_search_cost_beside_held_out_quality_and_counts_the_target(tmp_path):
    result = _p1_result(tmp_path, _report())
    result["config"]["parts"] = ["p1", "p3"]
    result["quality"][0]["costs"] = [
        {"method": "dp", "nfe": 4, "model_calls": 10, "seconds": 1.0, "peak_rss_mb": 0.0, "search_over_reference": 2.4},
        {"method": "dp", "nfe": 8, "model_calls": 20, "seconds": 2.0, "peak_rss_mb": 0.0, "search_over_reference": 3.1},
        {"method": "olss", "nfe": 4, "model_calls": 5, "seconds": 0.5, "peak_rss_mb": 0.0, "search_over_reference": 1.2}]
    md = markdown(result, tmp_path)
    assert "| m-euler | 4 | 2.4× · 4 | – | 1.2× · – |" in md  # olss cost without a P1 row: metric unknown
    assert "| m-euler | 8 | 3.1× · 6.5 | – | – |" in md
    assert "Default dp at ≤ 2.5 reference passes: 1 of 2 cells. Over it: m-euler NFE 8 (3.1×)." in md
