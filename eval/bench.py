"""``stepsmith bench``: the benchmark suite, in one run, on the embedded models.

    stepsmith bench --out runs/bench                  # full run (about an hour on 2 CPU cores)
    stepsmith bench --reduced --out runs/bench-ci     # seconds; CI runs it so the script never rots

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
  pipeline at equal NFE (:mod:`eval.bench_overhead`).
* **P5 straightening** — BOSS vs reflow vs k-step distillation at equal training budget
  (:mod:`distill.bench`).

Every number in the file is measured by the run that writes it; the machine, versions, seeds and
N are written next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schedules.io import StepsmithError, atomic_write, atomic_write_json

SEARCHED = ("dp", "evolution", "ays")


@dataclass
class BenchConfig:
    """What one benchmark run measures. :data:`FULL` and :data:`REDUCED` are the presets."""

    configs: tuple[tuple[str, str], ...] = (
        ("builtin:toy2d-flow", "euler"), ("builtin:digits-flow", "euler"),
        ("builtin:digits-ddpm", "ddim"), ("builtin:digits-ddpm", "dpmpp-2m"))
    nfe: tuple[int, ...] = (2, 4, 6, 8, 10)
    num: int = 500                      # evaluation samples per cell
    teacher_steps: int = 50             # Heun steps of the evaluation teacher
    search_samples: int = 32
    searched: tuple[str, ...] = SEARCHED
    # per-method search options; "grid" is replaced by grid_2d for the 2-D model
    options: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "dp": {"grid": 60, "candidates": 6, "max_sweeps": 2},
        "evolution": {"grid": 60, "population": 16, "generations": 8},
        "ays": {"draws": 1, "candidates": 9, "max_sweeps": 3, "teacher_steps": 50},
    })
    grid_2d: int = 100
    overhead: dict[str, Any] = field(default_factory=lambda: {"pipelines": ("flow", "ddpm"), "nfe": 8, "batch": 8,
                                                              "repeats": 20, "warmup": 2})
    distill: list[str] = field(default_factory=lambda: [
        "--model", "builtin:toy2d-flow", "--nfe", "1", "2", "3", "4", "5", "6", "--steps", "300", "--pairs", "4000",
        "--teacher-steps", "100", "--eval-samples", "2000", "--table-options", '{"free_start": false}'])
    parts: tuple[str, ...] = ("p1", "p2", "p3", "p4", "p5")


FULL = BenchConfig()
REDUCED = BenchConfig(
    configs=(("builtin:toy2d-flow", "euler"), ("builtin:digits-ddpm", "ddim")), nfe=(2, 4), num=64, teacher_steps=8,
    search_samples=8,
    options={"dp": {"grid": 16, "candidates": 2, "max_sweeps": 1},
             "evolution": {"grid": 16, "population": 6, "generations": 2},
             "ays": {"draws": 1, "candidates": 3, "max_sweeps": 1, "teacher_steps": 8}},
    grid_2d=16,
    overhead={"pipelines": ("flow",), "nfe": 2, "batch": 2, "repeats": 2, "warmup": 1},
    distill=["--model", "builtin:toy2d-flow", "--nfe", "1", "2", "--steps", "20", "--pairs", "256", "--teacher-steps",
             "10", "--reference-steps", "10", "--straight-steps", "10", "--eval-samples", "128", "--straight-samples",
             "64", "--search-samples", "8", "--table-options",
             '{"grid": 16, "candidates": 2, "max_sweeps": 1, "free_start": false}',
             "--batch-size", "64", "--warmup", "5"],
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


def _search_options(cfg: BenchConfig, method: str, adapter) -> dict[str, Any]:
    opts = dict(cfg.options.get(method, {}))
    if "grid" in opts and len(adapter.sample_shape) == 1:
        opts["grid"] = cfg.grid_2d
    return opts


def run_quality(cfg: BenchConfig, out: Path, progress: bool) -> list[dict[str, Any]]:
    """P1 and P3: search every method, build every baseline, score them all in one sweep per config."""
    from eval.sweep import run_sweep
    from schedules.adapters import load_model
    from schedules.baselines import BASELINES
    from schedules.search import make_table

    results = []
    for model, solver in cfg.configs:
        name = _config_name(model, solver)
        adapter = load_model(model)
        tables, costs, skipped = [], [], {}
        for method in cfg.searched:
            for n in cfg.nfe:
                with PeakRSS() as mem:
                    t = make_table(adapter, method, n, solver, samples=cfg.search_samples, seed=0, progress=progress,
                                   **_search_options(cfg, method, adapter))
                p = t.provenance  # make_table records the search's model calls and seconds
                cost = {"method": method, "nfe": n, "model_calls": p["model_calls"],
                        "seconds": round(float(p["seconds"]), 2), "peak_rss_mb": mem.peak_mb}
                if "reference_seconds" in p:
                    ref = max(float(p["reference_seconds"]), 1e-9)
                    cost.update(reference_seconds=p["reference_seconds"],
                                dp_over_reference=p.get("dp_over_reference"),
                                search_over_reference=round(cost["seconds"] / ref, 2))
                costs.append(cost)
                tables.append(t)
                if progress:
                    print(f"[bench] {name}: {method} NFE {n}: {cost['seconds']} s, {cost['model_calls']} calls",
                          file=sys.stderr, flush=True)
        for b in BASELINES:
            for n in cfg.nfe:
                try:
                    tables.append(make_table(adapter, b, n, solver))
                except StepsmithError as exc:
                    skipped.setdefault(b, str(exc).split(";")[0])
        report = run_sweep(adapter, tables=tables, num=cfg.num, teacher_steps=cfg.teacher_steps, out=out / "p1" / name,
                           progress=progress, command=f"stepsmith bench ({name})")
        results.append({"name": name, "model": model, "solver": solver, "report": report, "costs": costs,
                        "skipped_baselines": skipped})
    return results


def teacher_gap(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """P2: per NFE, (uniform - best) / (uniform - teacher), and which table is best."""
    rep = result["report"]
    teacher = rep["teacher"]["value"]
    gap: dict[int, dict[str, Any]] = {}
    for n in rep["nfe"]:
        rows = [r for r in rep["results"] if r["nfe"] == n]
        uni = next((r["value"] for r in rows if r["label"] == "uniform"), None)
        best = min(rows, key=lambda r: r["value"])
        frac = None if uni is None or uni == teacher else (uni - best["value"]) / (uni - teacher)
        gap[n] = {"uniform": uni, "best": best["value"], "best_label": best["label"], "teacher": teacher,
                  "closed": None if frac is None else round(frac, 4)}
    return gap


def run_overhead(cfg: BenchConfig) -> list[dict[str, Any]]:
    """P4: plugged table vs default schedule in the real diffusers pipeline."""
    from eval.bench_overhead import bench

    o = cfg.overhead
    return [bench(w, o["nfe"], o["batch"], o["repeats"], o["warmup"]) for w in o["pipelines"]]


def run_distill(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """P5: BOSS vs reflow vs k-step at equal budget (``python -m distill.bench``)."""
    import torch

    from distill import bench as dbench

    path = out / "p5" / "distill.json"
    threads = torch.get_num_threads()
    dbench.main([*cfg.distill, "--threads", str(threads), "--out", str(path)])
    torch.set_num_threads(threads)
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}"


def _rel(path: Path, md_dir: Path) -> str:
    return os.path.relpath(path, md_dir).replace(os.sep, "/")


def plot_gap(quality: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from schedules.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for res in quality:
        g = teacher_gap(res)
        xs = [n for n in g if g[n]["closed"] is not None]
        ax.plot(xs, [100 * g[n]["closed"] for n in xs], marker="o", label=res["name"])
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("NFE")
    ax.set_ylabel("uniform → teacher gap closed (%)")
    ax.set_title("P2: share of the gap to the teacher closed by the best table", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def markdown(result: dict[str, Any], md_dir: Path) -> str:
    from eval.report import METRIC_NAMES, grid_table

    out = Path(result["out"])
    m = result["machine"]
    lines = ["# stepsmith benchmarks", "",
             f"Written by `{result['command']}` on {result['date']} in {result['seconds']:.0f} s"
             + (" — **reduced preset (CI smoke run): numbers are not meaningful**" if result["reduced"] else "") + ".",
             "", f"- machine: {m['platform']}, {m['cpus']} CPUs, torch threads {m['threads']}, no GPU",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"- tables searched on noise seed 0 with {result['config']['search_samples']} search samples; every "
             f"cell evaluated on held-out noise seed 10 000 (N = {result['config']['num']} per cell, the same noises "
             f"for every row); teacher = Heun, {result['config']['teacher_steps']} steps, same noises",
             "- NFE = network evaluations per sample (Heun: 2K-1, DPM++(2M): K, Euler/DDIM: K); the final jump to "
             "σ = 0 is a step and counts", ""]
    quality = result.get("quality") or []
    if quality:
        lines += ["## P1 — quality vs NFE", "",
                  "Lower is better; **bold** = best per column. Digits: FID (KID in brackets) on the 128-d "
                  "digits-features network against real digits (N is small, so FID is biased upward: compare rows, "
                  "not papers). 2-D: exact Wasserstein-2 (POT) against true samples.", ""]
        for res in quality:
            rep = res["report"]
            labels, nfes, cells = grid_table(rep)
            kid = {(r["label"], r["nfe"]): r["extra"].get("kid") for r in rep["results"]}
            best = {n: min(cells[(lab, n)] for lab in labels if (lab, n) in cells) for n in nfes}
            metric = METRIC_NAMES.get(rep["metric"], rep["metric"])
            lines += [f"### {res['name']} — {metric}, solver {res['solver']}", "",
                      "| table | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
            for lab in labels:
                row = []
                for n in nfes:
                    v = cells.get((lab, n))
                    if v is None:
                        row.append("–")
                        continue
                    s = _fmt(v)
                    if kid.get((lab, n)) is not None:
                        s += f" ({kid[(lab, n)]:.3g})"
                    row.append(f"**{s}**" if v == best[n] else s)
                name = f"*{lab}*" if lab in SEARCHED else lab
                lines.append(f"| {name} | " + " | ".join(row) + " |")
            t = rep["teacher"]
            tk = t.get("extra", {}).get("kid")
            tv = _fmt(t["value"]) + (f" ({tk:.3g})" if tk is not None else "")
            lines.append(f"| teacher (Heun NFE {t['nfe']}) | " + " | ".join(tv for _ in nfes) + " |")
            if res["skipped_baselines"]:
                lines.append("")
                lines.append("Not applicable here: " + "; ".join(f"`{b}` ({why})" for b, why in res["skipped_baselines"].items()))
            searched_best = {n: min((cells[(s, n)] for s in SEARCHED if (s, n) in cells), default=None) for n in nfes}
            base_best = {n: min((cells[(lab, n)] for lab in labels if lab not in SEARCHED and (lab, n) in cells),
                                default=None) for n in nfes}
            default_v = {n: cells.get(("default", n)) for n in nfes}
            lines += ["", "| | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|",
                      "| best searched ÷ best baseline | " + " | ".join(
                          _fmt(searched_best[n] / base_best[n], 3) if searched_best[n] and base_best[n] else "–"
                          for n in nfes) + " |",
                      "| best searched ÷ diffusers default | " + " | ".join(
                          _fmt(searched_best[n] / default_v[n], 3) if searched_best[n] and default_v[n] else "–"
                          for n in nfes) + " |"]
            plot = out / "p1" / res["name"] / "quality_vs_nfe.png"
            lines += ["", f"![{res['name']}]({_rel(plot, md_dir)})", ""]
    if "p2" in result["config"]["parts"] and quality:
        lines += ["## P2 — share of the uniform → teacher gap closed by the best table", "",
                  "(uniform − best) ÷ (uniform − teacher); 100% = the best table at this NFE scores like the teacher.",
                  "", "| config | " + " | ".join(f"NFE {n}" for n in result["config"]["nfe"]) + " |",
                  "|---" * (len(result["config"]["nfe"]) + 1) + "|"]
        for res in quality:
            g = teacher_gap(res)
            lines.append(f"| {res['name']} | " + " | ".join(
                "–" if g[n]["closed"] is None else f"{100 * g[n]['closed']:.0f}% ({g[n]['best_label']})" for n in g) + " |")
        lines += ["", f"![P2]({_rel(out / 'p2_gap_closed.png', md_dir)})", ""]
    if "p3" in result["config"]["parts"] and quality:
        lines += ["## P3 — search cost", "",
                  "Model calls are batched network evaluations (batch = search samples). Peak MB = growth of the "
                  "process's resident memory above its level at the start of the search (memory freed by an earlier "
                  "search and reused reads as 0). `dp ÷ ref` = cost-accumulation seconds ÷ reference-pass "
                  "seconds; `search ÷ ref` = the whole search (teacher DP, student DP, final-error refinement) ÷ "
                  "reference-pass seconds.", "",
                  "| config | method | NFE | model calls | seconds | peak MB | dp ÷ ref | search ÷ ref |",
                  "|---|---|---|---|---|---|---|---|"]
        for res in quality:
            for c in res["costs"]:
                lines.append(f"| {res['name']} | {c['method']} | {c['nfe']} | {c['model_calls']} | {c['seconds']:.1f} | "
                             f"{_fmt(c['peak_rss_mb'], 3)} | {_fmt(c.get('dp_over_reference'), 3)} | "
                             f"{_fmt(c.get('search_over_reference'), 3)} |")
        lines.append("")
    if result.get("overhead"):
        lines += ["## P4 — run-time cost of a plugged table", "",
                  "Same pipeline, same seed, equal NFE; default schedule vs `pipe(**pipeline_kwargs(table, pipe))`, "
                  "interleaved repeats, median wall time.", "",
                  "| pipeline | NFE | batch | repeats | UNet calls default / plugged | median s default | median s plugged "
                  "| ratio | pipeline_kwargs ms |", "|---|---|---|---|---|---|---|---|---|"]
        for o in result["overhead"]:
            lines.append(f"| {o['pipeline']} | {o['nfe']} | {o['batch']} | {o['repeats']} | "
                         f"{o['unet_calls']['default']} / {o['unet_calls']['plugged']} | {o['median_s']['default']} | "
                         f"{o['median_s']['plugged']} | **{o['ratio_plugged_over_default']}** | {o['pipeline_kwargs_ms']} |")
        lines.append("")
    if result.get("distill"):
        from distill.bench import markdown as distill_md

        d = result["distill"]
        lines += ["## P5 — straightening: BOSS vs reflow vs k-step at equal budget", "",
                  f"`python -m distill.bench {shlex.join(result['config']['distill'])}`: every student gets the same "
                  "teacher trajectories, optimizer steps, batch size and learning rate. Cells: metric "
                  "(RMSE to the teacher's sample from the same noise).", "", distill_md(d), ""]
    return "\n".join(lines) + "\n"


def resolve_markdown_path(out: str | Path, given: str | Path | None = None) -> Path:
    """Where BENCHMARKS.md goes: ``given``, else inside the run's output folder."""
    return Path(given) if given else Path(out) / "BENCHMARKS.md"


def run_bench(cfg: BenchConfig = FULL, out: str | Path = "runs/bench", *, markdown_path: str | Path | None = None,
              reduced: bool = False, progress: bool = True, command: str = "stepsmith bench") -> dict[str, Any]:
    import diffusers
    import torch
    import torchmetrics

    from schedules.table import package_version

    unknown = set(cfg.parts) - {"p1", "p2", "p3", "p4", "p5"}
    if unknown:
        raise StepsmithError(f"unknown benchmark parts {sorted(unknown)}; choose from p1,p2,p3,p4,p5")
    out = Path(out)
    md_path = resolve_markdown_path(out, markdown_path)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "format": "stepsmith.bench/v1", "command": command, "reduced": reduced, "out": str(out),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {**asdict(cfg)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "versions": {"stepsmith": package_version(), "python": platform.python_version(),
                                 "torch": torch.__version__, "diffusers": diffusers.__version__,
                                 "torchmetrics": torchmetrics.__version__}},
    }
    if {"p1", "p2", "p3"} & set(cfg.parts):
        result["quality"] = run_quality(cfg, out, progress)
        plot_gap(result["quality"], out / "p2_gap_closed.png")
    if "p4" in cfg.parts:
        result["overhead"] = run_overhead(cfg)
    if "p5" in cfg.parts:
        result["distill"] = run_distill(cfg, out)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    from eval.report import _jsonable

    atomic_write_json(out / "bench.json", _jsonable(result))
    atomic_write(md_path, markdown(result, md_path.resolve().parent))
    return result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark suite P1-P5 on the embedded models → BENCHMARKS.md",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, figures and per-config reports")
    p.add_argument("--markdown", default=None, help="where to write BENCHMARKS.md (default OUT/BENCHMARKS.md)")
    p.add_argument("--reduced", action="store_true", help="tiny sizes: a smoke run that finishes in seconds")
    p.add_argument("--parts", default="p1,p2,p3,p4,p5", help="comma-separated subset of p1..p5")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--render", metavar="BENCH_JSON", default=None,
                   help="only re-write the Markdown from an earlier run's bench.json (no measurement)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    if args.render:
        result = json.loads(Path(args.render).read_text())
        md = resolve_markdown_path(result["out"], args.markdown)
        atomic_write(md, markdown(result, md.resolve().parent))
        print(f"wrote {md} from {args.render}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(REDUCED if args.reduced else FULL, parts=tuple(p for p in args.parts.split(",") if p))
    md = resolve_markdown_path(args.out, args.markdown)
    result = run_bench(cfg, args.out, markdown_path=md, reduced=args.reduced,
                       command=getattr(args, "invocation", "stepsmith bench"))
    print(f"wrote {md} and {Path(args.out) / 'bench.json'} in {result['seconds']:.0f} s")
