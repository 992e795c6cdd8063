"""``stepsmith bench``: the benchmark suite, in one run, on the embedded models.

    stepsmith bench --out runs/bench                  # full run (about an hour on 2 CPU cores)
    stepsmith bench --reduced --out runs/bench-ci     # seconds; CI runs it so the suite never rots
    stepsmith bench --render                          # re-write BENCHMARKS.md from the committed bench.json
    stepsmith bench --only digits-flow-euler --rows dp,ays --out runs/rows   # re-measure two rows of one config
    stepsmith bench --merge benchmarks/results/bench/bench.json runs/rows/bench.json --out benchmarks/results/bench \
        --markdown BENCHMARKS.md                      # ...and splice them into the committed run

Writes ``BENCHMARKS.md`` (or ``--markdown PATH``), ``bench.json`` and the figures under ``--out``:

* **P1 quality** — every searched method (dp, evolution, ays) and every baseline × NFE × solver
  (Euler for flow models; DDIM and DPM-Solver++(2M) for the VP model), scored on held-out noises
  (seed 10 000; tables are searched on seed 0): FID and KID on the digits-features network for
  the digits models, exact Wasserstein-2 for the 2-D model, with the teacher row
  (:func:`eval.sweep.run_sweep`).
* **P2 teacher gap** — fraction of the uniform → teacher gap closed by the best table per NFE.
* **P3 search cost** — model calls (batched network evaluations), seconds and peak resident-memory
  growth per search; for ``dp`` its seconds ÷ the seconds of its reference pass.
* **P4 run-time cost** — a plugged table vs the pipeline's default schedule in the real diffusers
  pipeline at equal NFE (:mod:`benchmarks.overhead`).
* **P5 straightening** — BOSS vs reflow vs k-step distillation at equal training budget
  (:mod:`benchmarks.distill`).

A ``--rows`` run searches and scores only the named searched rows (and the teacher, whose score must equal the
base run's: the check that the evaluation reproduces it), keeps every other row, baseline and cost of the config
from ``--base`` and recomputes MMHM over the spliced rows; ``report["spliced"]`` and ``runs`` say which rows
came from which command.

Every number in the file is measured by the run that writes it; the machine, versions, seeds and
N are written next to them. The committed run is ``benchmarks/results/bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.distill import DistillBenchConfig, run_distill_bench
from benchmarks.overhead import OverheadConfig, run_overhead
from benchmarks.report import COST_TARGET, markdown, plot_gap
from schedules.io import StepsmithError, atomic_write, atomic_write_json

PARTS = ("p1", "p2", "p3", "p4", "p5")
COMMITTED = Path(__file__).resolve().parent / "results" / "bench" / "bench.json"


@dataclass(frozen=True)
class SearchedRow:
    """A searched row of P1: ``method`` with ``options`` on top of the config's options for that method."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    all_budgets: bool = False  # every NFE from one search (the published DP algorithms solve all budgets at once)


# stepsmith's searches at their defaults, the old dp objective, and the published DP algorithms as their
# authors define them (their own grids and costs: no shared dp options)
SEARCHED_ROWS = (
    SearchedRow("dp", "dp"), SearchedRow("dp-teacher-mse", "dp", {"objective": "teacher-mse"}),
    SearchedRow("dp-data-fid", "dp", {"objective": "data-fid"}),
    SearchedRow("dp-max-cost", "dp", {"max_cost": COST_TARGET}),  # the budgeted default: cost vs quality side by side
    SearchedRow("evolution", "evolution"), SearchedRow("ays", "ays", {}, True), SearchedRow("olss", "olss"),
    SearchedRow("dp-boss", "dp", {"variant": "boss"}, True), SearchedRow("dp-gits", "dp", {"variant": "gits"}, True),
    SearchedRow("dp-oss", "dp", {"variant": "oss"}, True),
)
VARIANT_OPTIONS = ("variant",)  # a row with these options does not take the config's dp options
IMAGE_METRICS = "fid,kid,precision,recall,is,mmhm"  # P1 metrics of image models (2-D: exact Wasserstein-2)


@dataclass
class BenchConfig:
    """What one benchmark run measures. :data:`FULL` and :data:`REDUCED` are the presets.

    ``conditioning``: per model, the class set and guidance of a class-conditional model
    (``{"classes": "all", "guidance": 3.0}``); ``only``: names of the P1 configs to run (all if empty),
    so that configs can run in parallel processes and be merged (``stepsmith bench --merge``).
    """

    configs: tuple[tuple[str, str], ...] = (
        ("builtin:toy2d-flow", "euler"), ("builtin:digits-flow", "euler"),
        ("builtin:digits-ddpm", "ddim"), ("builtin:digits-ddpm", "dpmpp-2m"), ("builtin:sharp-ddpm", "ddim"),
        ("builtin:digits-cond", "euler"))
    conditioning: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "builtin:digits-cond": {"classes": "all", "guidance": 3.0}})
    nfe: tuple[int, ...] = (2, 4, 6, 8, 10)
    num: int = 500                      # evaluation samples per cell
    teacher_steps: int = 50             # Heun steps of the evaluation teacher
    search_samples: int = 32
    searched: tuple[SearchedRow, ...] = SEARCHED_ROWS
    only: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()          # re-measure only these searched rows, the rest from `base` (splice_rows)
    base: str | None = None             # the bench.json whose other rows, teacher and baselines are kept
    # per config: other budgets, searched rows left out (keeps the full run within about 100 minutes on 2 cores)
    nfe_of: dict[str, tuple[int, ...]] = field(default_factory=lambda: {
        "sharp-ddpm-ddim": (4, 6, 8), "digits-cond-euler": (4, 6, 8)})
    # dp-data-fid (FID against the data as the objective) only where it changes the picture: the guided model
    skip_rows: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "toy2d-flow-euler": ("dp-teacher-mse", "dp-data-fid"), "digits-flow-euler": ("dp-data-fid",),
        "digits-ddpm-ddim": ("dp-data-fid",), "digits-ddpm-dpmpp-2m": ("dp-teacher-mse", "dp-data-fid"),
        "sharp-ddpm-ddim": ("dp-data-fid",),
        "digits-cond-euler": ("dp-teacher-mse", "dp-max-cost", "evolution", "ays", "olss", "dp-boss", "dp-gits",
                              "dp-oss")})
    # evaluation samples per cell where `num` is too few: exact W2 of 500 2-D points moves by more between eval
    # seeds (leading NFE 8: 0.199 at seed 10 000, 0.229 at 20 000) than the rows differ
    num_of: dict[str, int] = field(default_factory=lambda: {"toy2d-flow-euler": 2000})
    # per-method search options; "grid" is replaced by grid_2d for the 2-D model
    options: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "dp": {"grid": 60, "candidates": 6, "max_sweeps": 2},
        "evolution": {"grid": 60, "population": 16, "generations": 8},
        "ays": {"draws": 1, "candidates": 9, "max_sweeps": 3, "teacher_steps": 50},
    })
    grid_2d: int = 100
    overhead: OverheadConfig = OverheadConfig()
    # digits (on toy2d every student sits at the W2 floor); measured 1245 s on one thread (benchmarks/results/bench-p5)
    distill: DistillBenchConfig = DistillBenchConfig(
        model="builtin:digits-flow", nfe=(1, 2, 4), methods=("boss", "reflow", "ot-reflow", "kstep"), steps=200,
        batch_size=64, warmup=20, pairs=1024, teacher_steps=30, reference_steps=50, eval_samples=1000,
        straight_samples=100, straight_steps=50, search_samples=32, table_options={"free_start": False})
    parts: tuple[str, ...] = PARTS


FULL = BenchConfig()
REDUCED = BenchConfig(
    configs=(("builtin:toy2d-flow", "euler"), ("builtin:digits-ddpm", "ddim")), nfe=(2, 4), num=64, teacher_steps=8,
    search_samples=8, searched=tuple(r for r in SEARCHED_ROWS if not r.label.startswith(("dp-boss", "dp-gits", "dp-oss")))
    + (SearchedRow("dp-boss", "dp", {"variant": "boss", "grid": 16}, True),),
    nfe_of={}, skip_rows={}, num_of={},
    options={"dp": {"grid": 16, "candidates": 2, "max_sweeps": 1},
             "evolution": {"grid": 16, "population": 6, "generations": 2},
             "ays": {"draws": 1, "candidates": 3, "max_sweeps": 1, "teacher_steps": 8}},
    grid_2d=16,
    overhead=OverheadConfig(pipelines=("flow",), nfe=2, batch=2, repeats=2, warmup=1),
    distill=DistillBenchConfig(
        nfe=(1, 2), steps=20, pairs=256, teacher_steps=10, reference_steps=10, straight_steps=10, eval_samples=128,
        straight_samples=64, search_samples=8, batch_size=64, warmup=5,
        table_options={"grid": 16, "candidates": 2, "max_sweeps": 1, "free_start": False}),
)


class PeakRSS:
    """Peak growth of this process's resident memory (MB) while the block runs (Linux /proc)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_mb = interval, None

    @staticmethod
    def _rss_mb() -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> PeakRSS:
        self._start = self._rss_mb()
        self._max = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            v = self._rss_mb()
            if v is not None and self._max is not None:
                self._max = max(self._max, v)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._start is not None:
            end = self._rss_mb() or self._start
            self.peak_mb = round(max(self._max, end) - self._start, 1)


# --------------------------------------------------------------------------- parts


def _config_name(model: str, solver: str) -> str:
    return f"{model.split(':', 1)[-1]}-{solver}"


def _search_options(cfg: BenchConfig, row: SearchedRow, adapter) -> dict[str, Any]:
    """The row's options on top of the config's options for its method (not for a published variant)."""
    opts = {} if set(VARIANT_OPTIONS) & set(row.options) else dict(cfg.options.get(row.method, {}))
    if "grid" in opts and len(adapter.sample_shape) == 1:
        opts["grid"] = cfg.grid_2d
    return {**opts, **row.options}


def _search_cost(label: str, nfe: int, provenance: dict[str, Any], peak_mb: float | None) -> dict[str, Any]:
    """P3 row of one search, from the model calls and seconds ``make_table`` records in the table."""
    p = provenance
    cost = {"method": label, "nfe": nfe, "model_calls": p["model_calls"], "seconds": round(float(p["seconds"]), 2),
            "peak_rss_mb": peak_mb}
    if "reference_seconds" in p:
        ref = max(float(p["reference_seconds"]), 1e-9)
        cost.update(reference_seconds=p["reference_seconds"], dp_over_reference=p.get("dp_over_reference"),
                    search_over_reference=round(cost["seconds"] / ref, 2))
    return cost


def _searched_tables(cfg: BenchConfig, adapter, solver: str, name: str, progress: bool) -> tuple[list, list[dict]]:
    """Every searched method at every NFE (search seed 0), with its P3 cost."""
    from schedules.search import make_table, make_tables

    tables, costs = [], []
    nfes = cfg.nfe_of.get(name, cfg.nfe)
    for row in cfg.searched:
        if row.label in cfg.skip_rows.get(name, ()) or (cfg.rows and row.label not in cfg.rows):
            continue
        if row.all_budgets:
            calls0, t0 = getattr(adapter, "calls", 0), time.perf_counter()
            with PeakRSS() as mem:
                tabs = make_tables(adapter, row.method, list(nfes), solver, samples=cfg.search_samples, seed=0,
                                   progress=progress, **_search_options(cfg, row, adapter))
            costs.append({"method": row.label, "nfe": ",".join(map(str, tabs)), "model_calls":
                          getattr(adapter, "calls", 0) - calls0, "seconds": round(time.perf_counter() - t0, 2),
                          "peak_rss_mb": mem.peak_mb, "one_pass": True})
            tables += [(row.label, t) for t in tabs.values()]
            if progress:
                print(f"[bench] {name}: {row.label} NFE {costs[-1]['nfe']}: {costs[-1]['seconds']} s",
                      file=sys.stderr, flush=True)
            continue
        for n in nfes:
            try:
                with PeakRSS() as mem:
                    t = make_table(adapter, row.method, n, solver, samples=cfg.search_samples, seed=0,
                                   progress=progress, **_search_options(cfg, row, adapter))
            except StepsmithError as exc:  # e.g. a budget the method's grid cannot hold: the cell stays empty
                costs.append({"method": row.label, "nfe": n, "skipped": str(exc).split(";")[0]})
                continue
            costs.append(_search_cost(row.label, n, t.provenance, mem.peak_mb))
            tables.append((row.label, t))
            if progress:
                print(f"[bench] {name}: {row.label} NFE {n}: {costs[-1]['seconds']} s, {costs[-1]['model_calls']} "
                      "calls", file=sys.stderr, flush=True)
    return tables, costs


def _baseline_tables(cfg: BenchConfig, adapter, solver: str, name: str) -> tuple[list, dict[str, str]]:
    """Every baseline at every NFE, and why the baselines that do not apply to this model were skipped."""
    from schedules.baselines import BASELINES
    from schedules.search import make_table

    tables, skipped = [], {}
    for b in BASELINES:
        for n in cfg.nfe_of.get(name, cfg.nfe):
            try:
                tables.append(make_table(adapter, b, n, solver))
            except StepsmithError as exc:
                skipped.setdefault(b, str(exc).split(";")[0])
    return tables, skipped


def run_quality(cfg: BenchConfig, out: Path, progress: bool, command: str) -> list[dict[str, Any]]:
    """P1 and P3: search every method, build every baseline, score them all in one sweep per config."""
    from eval.report import write_report
    from eval.sweep import run_sweep
    from schedules.adapters import load_model

    results = []
    base = _base_configs(cfg)
    for model, solver in cfg.configs:
        name = _config_name(model, solver)
        if cfg.only and name not in cfg.only:
            continue
        adapter = load_model(model, conditioning=_conditioning(cfg, model))
        searched, costs = _searched_tables(cfg, adapter, solver, name, progress)
        baselines, skipped = _baseline_tables(cfg, adapter, solver, name) if not cfg.rows else ([], {})
        metric = None if len(adapter.sample_shape) == 1 else IMAGE_METRICS + (
            ",class-accuracy,fid-teacher" if getattr(adapter, "conditioning", None) is not None else "")
        report = run_sweep(adapter, tables=searched + [(b.method, b) for b in baselines], num=cfg.num_of.get(name, cfg.num),
                           teacher_steps=cfg.teacher_steps, metric=metric,
                           out=out / "p1" / name, progress=progress, command=command)
        entry = {"name": name, "model": model, "solver": solver, "conditioning": cfg.conditioning.get(model),
                 "report": report, "costs": costs, "skipped_baselines": skipped}
        if cfg.rows:
            entry = splice_rows(base[name], entry, [r for r in cfg.rows if r not in cfg.skip_rows.get(name, ())],
                                cfg.base)
            write_report(entry["report"], out / "p1" / name)  # over the partial report the sweep wrote
        results.append(entry)
    return results


def _base_configs(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """The configs of ``cfg.base`` by name ({} without ``rows``); refused when a config to re-measure is not there."""
    if not cfg.rows:
        return {}
    known = {r.label for r in cfg.searched}
    if set(cfg.rows) - known:
        raise StepsmithError(f"unknown --rows {sorted(set(cfg.rows) - known)}; choose from {', '.join(sorted(known))}",
                             param="rows")
    base = json.loads(Path(cfg.base or COMMITTED).read_text())
    configs = {q["name"]: q for q in base.get("quality") or []}
    wanted = [_config_name(m, s) for m, s in cfg.configs if not cfg.only or _config_name(m, s) in cfg.only]
    missing = [n for n in wanted if n not in configs]
    if missing:
        raise StepsmithError(f"--rows re-measures rows of configs in the base run; {cfg.base or COMMITTED} has no "
                             f"{missing} (run those configs in full, or pass --only)", param="only")
    return configs


def splice_rows(base: dict[str, Any], new: dict[str, Any], labels: list[str], base_path: str | None) -> dict[str, Any]:
    """``base``'s P1 config with the rows (and P3 costs) labelled ``labels`` replaced by ``new``'s.

    Everything else — teacher, baselines, other searched rows — is the base run's: the evaluation is the same
    noises (seed 10 000), N and metrics, so rows of the two runs compare. MMHM, whose bounds are the min/max over
    the rows of each NFE, is recomputed over the spliced rows.
    """
    from eval.sweep_metrics import MetricPlan, apply_mmhm, mmhm_info

    rep, got = base["report"], new["report"]
    for key in ("num", "eval_seed", "metrics"):
        if rep.get(key) != got.get(key):
            raise StepsmithError(f"the base run's {key} {rep.get(key)} differs from this run's {got.get(key)}: "
                                 "rows of the two runs do not compare; run the config in full")
    t_base, t_new = (rep.get("teacher") or {}).get("value"), (got.get("teacher") or {}).get("value")
    if t_base is not None and (t_new is None or abs(t_new - t_base) > 1e-6 * max(1.0, abs(t_base))):
        # the teacher row, re-measured on the same noises, is the check that this evaluation reproduces the base's
        raise StepsmithError(f"the teacher scores {t_new} here and {t_base} in the base run: the evaluation does not "
                             "reproduce the base run's, so its rows cannot be kept; run the config in full")
    order = [r.label for r in SEARCHED_ROWS]

    def rank(label: str) -> int:  # searched rows in preset order, then the baselines (stable sorts keep NFE order)
        return order.index(label) if label in order else len(order)

    rows = [r for r in got["results"] if r["label"] in labels] + [r for r in rep["results"] if r["label"] not in labels]
    rows.sort(key=lambda r: rank(r["label"]))
    report = {**rep, "results": rows, "methods": list(dict.fromkeys(r["label"] for r in rows)),
              "spliced": {"rows": labels, "from": got.get("command"), "base": str(base_path or COMMITTED),
                          "base_command": rep.get("command")}}
    names = tuple(rep.get("metrics") or ())
    if "mmhm" in names:
        plan = MetricPlan(names, True, True)
        used = apply_mmhm(rows, plan, None)
        report["mmhm"] = mmhm_info(rows, plan, used, "min/max over the rows of each NFE")
    costs = list(new["costs"]) + [c for c in base.get("costs", []) if c["method"] not in labels]
    costs.sort(key=lambda c: rank(c["method"]))
    return {**base, "report": report, "costs": costs}


def _conditioning(cfg: BenchConfig, model: str):
    """The :class:`~schedules.conditioning.Conditioning` of a class-conditional config, else ``None``."""
    from schedules.conditioning import Conditioning, parse_classes

    spec = cfg.conditioning.get(model)
    if spec is None:
        return None
    return Conditioning(labels=parse_classes(str(spec["classes"])), guidance=float(spec.get("guidance", 1.0)))


# --------------------------------------------------------------------------- the run


def resolve_markdown_path(out: str | Path, given: str | Path | None = None) -> Path:
    """Where BENCHMARKS.md goes: ``given``, else inside the run's output folder."""
    return Path(given) if given else Path(out) / "BENCHMARKS.md"


def _machine() -> dict[str, Any]:
    import diffusers
    import torch
    import torchmetrics

    from schedules.table import package_version

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "versions": {"stepsmith": package_version(), "python": platform.python_version(),
                         "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "torchmetrics": torchmetrics.__version__}}


def run_bench(cfg: BenchConfig = FULL, out: str | Path = "runs/bench", *, markdown_path: str | Path | None = None,
              reduced: bool = False, progress: bool = True, command: str = "stepsmith bench") -> dict[str, Any]:
    """Run the parts of ``cfg``; writes ``out/bench.json``, the figures and the Markdown, returns the result.

    ``command`` is recorded in every results file as the command that reproduces it.
    """
    from eval.report import _jsonable

    unknown = set(cfg.parts) - set(PARTS)
    if unknown:
        raise StepsmithError(f"unknown benchmark parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    out = Path(out)
    md_path = resolve_markdown_path(out, markdown_path)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "format": "stepsmith.bench/v1", "command": command, "reduced": reduced, "out": str(out),
        "markdown": str(md_path), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": asdict(cfg), "machine": _machine(),
    }
    if {"p1", "p2", "p3"} & set(cfg.parts):
        result["quality"] = run_quality(cfg, out, progress, command)
        plot_gap(result["quality"], out / "p2_gap_closed.png")
    if "p4" in cfg.parts:
        result["overhead"] = run_overhead(cfg.overhead)
    if "p5" in cfg.parts:
        result["distill"] = run_distill_bench(cfg.distill, out / "p5" / "distill.json", command=command,
                                              progress=progress)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "bench.json", _jsonable(result))
    atomic_write(md_path, markdown(result, md_path.resolve().parent))
    return result


def render(bench_json: str | Path = COMMITTED, markdown_path: str | Path | None = None) -> Path:
    """Re-write the Markdown of an earlier run from its ``bench.json`` (no measurement); returns its path.

    Figures are linked from the folder that holds ``bench_json``; the Markdown goes to
    ``markdown_path``, else where that run wrote it (resolved against the folder the run started
    in, so this works from any directory), else beside ``bench_json``.
    """
    bench_json = Path(bench_json).resolve()
    result = json.loads(bench_json.read_text())
    folder = bench_json.parent
    if markdown_path is None and result.get("markdown"):
        markdown_path = _run_dir(folder, Path(result["out"])) / result["markdown"]
    md = resolve_markdown_path(folder, markdown_path)
    atomic_write(md, markdown({**result, "out": str(folder)}, md.resolve().parent))
    return md


def merge(bench_jsons: list[str | Path], out: str | Path, markdown_path: str | Path | None = None,
          command: str = "stepsmith bench --merge") -> dict[str, Any]:
    """One result from runs of disjoint parts or configs (``--only``) run in parallel processes.

    A config measured by two runs is refused, unless the later one is a ``--rows`` run (it replaces the config it
    spliced into) or the first input is an earlier merged result (later runs update it).

    Each run's per-config folders (``p1/<config>``, ``p5``) are copied into ``out``; P1 configs keep the
    order of the full preset; P4 / P5 come from the run that measured them. ``seconds`` is the longest
    run (they ran side by side); each run's own command, date and seconds are kept under ``runs``.
    """
    import shutil

    from eval.report import _jsonable

    out = Path(out)
    runs = [json.loads(Path(p).read_text()) for p in bench_jsons]
    names = [_config_name(m, s) for m, s in FULL.configs]
    by_name: dict[str, dict[str, Any]] = {}
    replaceable = set()  # configs of an earlier merged result given first: later runs update it
    for i, r in enumerate(runs):
        for q in r.get("quality") or []:
            if q["name"] in by_name and q["name"] not in replaceable and not q["report"].get("spliced"):
                raise StepsmithError(f"configs measured twice in the runs to merge: {q['name']} (only a later --rows "
                                     "run, or any run after an earlier merged result given first, may replace a config)")
            replaceable.discard(q["name"])
            by_name[q["name"]] = q  # a --rows run (spliced) replaces the config of an earlier run
            if i == 0 and r.get("runs"):
                replaceable.add(q["name"])
    quality = list(by_name.values())
    quality.sort(key=lambda q: names.index(q["name"]) if q["name"] in names else len(names))
    for p in bench_jsons:
        src = Path(p).resolve().parent
        for part in ("p1", "p5"):
            if (src / part).is_dir() and src != out.resolve():
                shutil.copytree(src / part, out / part, dirs_exist_ok=True)
    first = runs[0]
    newest = max(runs, key=lambda r: r["date"])  # its preset (rows, options, N per config) is the one in force
    parts = sorted({p for r in runs for p in r["config"]["parts"]})
    result = {**first, "command": command, "out": str(out), "markdown": str(resolve_markdown_path(out, markdown_path)),
              "date": newest["date"], "config": {**first["config"], **newest["config"], "parts": parts, "only": [],
                                                 "rows": [], "base": None},
              "runs": [e for r in runs for e in _run_entries(r)],
              "seconds": max(r["seconds"] for r in runs)}
    for key in ("quality", "overhead", "distill"):  # taken from the runs below
        result.pop(key, None)
    if quality:
        result["quality"] = quality
        plot_gap(quality, out / "p2_gap_closed.png")
    for key in ("overhead", "distill"):
        got = [r[key] for r in runs if r.get(key)]
        if got:
            result[key] = got[0]
    if result.get("distill"):
        result["config"]["distill"] = next(r["config"]["distill"] for r in runs if r.get("distill"))
    atomic_write_json(out / "bench.json", _jsonable(result))
    md = Path(result["markdown"])
    atomic_write(md, markdown(result, md.resolve().parent))
    return result


def _run_entries(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``runs`` record of one merged input: its own runs if it is itself a merge, else the run."""
    if run.get("runs"):
        return list(run["runs"])
    e = {"command": run["command"], "date": run["date"], "seconds": run["seconds"],
         "configs": [q["name"] for q in run.get("quality") or []]}
    if run.get("config", {}).get("rows"):
        e["rows"] = list(run["config"]["rows"])
    return [e]


def _run_dir(folder: Path, out: Path) -> Path:
    """The folder a run started in, given where its ``--out`` folder is now (``out`` as it recorded it)."""
    n = len(out.parts)
    if not out.is_absolute() and n and folder.parts[-n:] == out.parts:
        return Path(*folder.parts[:-n])
    return Path.cwd()


# --------------------------------------------------------------------------- command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark suite P1-P5 on the embedded models → BENCHMARKS.md",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, figures and per-config reports")
    p.add_argument("--markdown", default=None, help="where to write BENCHMARKS.md (default OUT/BENCHMARKS.md)")
    p.add_argument("--reduced", action="store_true", help="tiny sizes: a smoke run that finishes in seconds")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of p1..p5")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--render", metavar="BENCH_JSON", nargs="?", const=str(COMMITTED), default=None,
                   help="only re-write the Markdown from an earlier run's bench.json (default: the committed run, "
                        "benchmarks/results/bench/bench.json), to where that run wrote it unless --markdown; "
                        "no measurement")
    p.add_argument("--only", default="", metavar="CONFIGS",
                   help="comma-separated P1 configs to run (e.g. digits-flow-euler,sharp-ddpm-ddim; default all): "
                        "split a run over parallel processes, each with its own --out, then --merge")
    p.add_argument("--rows", default="", metavar="LABELS",
                   help="comma-separated searched rows to re-measure (e.g. dp,ays,olss): only these are searched and "
                        "scored (with the teacher, which must reproduce the base run's); every other row, baseline "
                        "and cost of the config is kept from --base; MMHM is recomputed over the spliced rows")
    p.add_argument("--base", default=None, metavar="BENCH_JSON",
                   help="the run whose other rows --rows keeps (default: the committed benchmarks/results/bench/bench.json)")
    p.add_argument("--merge", nargs="+", metavar="BENCH_JSON", default=None,
                   help="combine the bench.json of runs of disjoint configs / parts into --out and its Markdown")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    import torch

    if args.render:
        md = render(args.render, args.markdown)
        print(f"wrote {md} from {args.render}")
        return
    if args.merge:
        res = merge(args.merge, args.out, args.markdown, command=getattr(args, "invocation", "stepsmith bench --merge"))
        print(f"wrote {res['markdown']} and {Path(args.out) / 'bench.json'} from {len(args.merge)} runs")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    base = REDUCED if args.reduced else FULL
    only = tuple(c for c in args.only.split(",") if c)
    known = [_config_name(m, s) for m, s in base.configs]
    if set(only) - set(known):
        raise StepsmithError(f"unknown --only configs {sorted(set(only) - set(known))}; choose from {', '.join(known)}",
                             param="only")
    rows = tuple(r for r in args.rows.split(",") if r)
    if args.base and not rows:
        raise StepsmithError("--base is the run --rows splices into; pass --rows too", param="base")
    cfg = replace(base, parts=tuple(p for p in args.parts.split(",") if p), only=only, rows=rows, base=args.base)
    md = resolve_markdown_path(args.out, args.markdown)
    result = run_bench(cfg, args.out, markdown_path=md, reduced=args.reduced,
                       command=getattr(args, "invocation", "stepsmith bench"))
    print(f"wrote {md} and {Path(args.out) / 'bench.json'} in {result['seconds']:.0f} s")
