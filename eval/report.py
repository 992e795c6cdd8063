"""Write a sweep report: ``report.json``, ``report.md`` and ``quality_vs_nfe.png`` (atomic).

A sweep with a metric list (``report["metrics"]``) also gets a per-NFE table of every metric
(best per column in bold, MMHM included), a headline saying where the main metric and MMHM pick
different rows, and ``metrics_vs_nfe.png`` (one panel per metric). A one-name sweep's report is
exactly as it always was.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from schedules.io import StepsmithError, atomic_path, atomic_write, atomic_write_json, remove_stale_siblings

METRIC_NAMES = {
    "fid": "FID",
    "kid": "KID",
    "wasserstein": "Wasserstein-2",
    "teacher": "MSE to teacher",
    "fid-teacher": "FID to teacher",
    "precision": "precision",
    "recall": "recall",
    "density": "density",
    "coverage": "coverage",
    "is": "IS",
    "class-accuracy": "class accuracy",
    "clip": "CLIP score",
    "mmhm": "MMHM",
}


def _higher(name: str) -> bool:
    """Whether metric ``name`` is better high (MMHM and :func:`eval.mmhm.metric_direction`'s list)."""
    from eval.mmhm import metric_direction

    try:
        return name == "mmhm" or metric_direction(name) == "higher"
    except StepsmithError:
        return False


def _better(name: str) -> str:
    return "higher" if _higher(name) else "lower"


def _best(values: list[tuple[float, str]], name: str) -> str:
    """The label of the best finite value for metric ``name``."""
    return (max(values) if _higher(name) else min(values))[1]


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == math.inf:
        return "inf"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}" if a < 10 else f"{v:.2f}"


def _label(report: dict[str, Any], r: dict[str, Any]) -> str:
    """A row's label; with several guidance scales the scale is part of it (``dp (w=3)``)."""
    if len(report.get("guidance") or ()) > 1 and r.get("guidance") is not None:
        return f"{r['label']} (w={r['guidance']:g})"
    return r["label"]


def grid_table(report: dict[str, Any]) -> tuple[list[str], list[int], dict[tuple[str, int], float]]:
    labels = list(dict.fromkeys(_label(report, r) for r in report["results"]))
    nfes = sorted({int(r["nfe"]) for r in report["results"]})
    cells = {(_label(report, r), int(r["nfe"])): float(r["value"]) for r in report["results"]}
    return labels, nfes, cells


def _header(report: dict[str, Any], name: str) -> list[str]:
    """Title and protocol bullets: metric, samples, seeds, real data, solver."""
    lines = [f"# {name} vs NFE — {report['model']}", ""]
    real = report.get("real") or {}
    fn = real.get("feature_network")
    lines += [
        f"- metric: **{name}** ({_better(report['metric'])} is better)"
        + (f", features `{fn['name']}` ({fn['num_features']}-d)" if fn else ""),
        f"- samples: N = {report['num']} generated per cell, all from the same noises "
        f"(`{report['eval_noise']}`)",
        f"- evaluation seed {report['eval_seed']}; search seeds {report['search_seeds'] or 'none (no searched tables)'}"
        f" — disjoint: {report['seeds_disjoint']}",
    ]
    if real:
        lines.append(f"- real data: {real.get('source')} (n = {real.get('n')})")
    lines.append(f"- solver: {report['solver']}; processes: {report['processes']}; total {report['seconds_total']:.1f} s")
    if report.get("guidance"):
        lines.append(f"- guidance: {', '.join(f'{w:g}' for w in report['guidance'])} — every (method, NFE) at each "
                     "scale, on the same noises and conditions; searched methods searched at each scale")
    if report.get("metric_space"):
        lines.append(f"- {report['metric_space']}")
    if report.get("metrics"):
        lines += _metrics_bullets(report)
    return lines + [""]


def _guidance_table(report: dict[str, Any]) -> list[str]:
    """Rows grouped per NFE and guidance: main metric and PSNR to that guidance's teacher; bold: best per group."""
    rows = sorted(report["results"], key=lambda r: (int(r["nfe"]), float(r["guidance"])))
    name = METRIC_NAMES.get(report["metric"], report["metric"])
    lines = ["", "## Per NFE and guidance", "", f"| NFE | guidance | method | {name} | PSNR to teacher (dB) |",
             "|---|---|---|---|---|"]
    for (nfe, w), group in _groups(rows):
        vals = [(float(r["value"]), r["label"]) for r in group if math.isfinite(float(r["value"]))]
        best = _best(vals, report["metric"]) if vals else None
        for r in group:
            s = _fmt(float(r["value"]))
            lines.append(f"| {nfe} | {w:g} | {r['label']} | {f'**{s}**' if r['label'] == best else s} | "
                         f"{_fmt(r['extra'].get('teacher_psnr'))} |")
    for t in report.get("teachers") or []:
        if t is not None:
            lines.append(f"| *teacher (NFE {t['nfe']})* | {t['guidance']:g} | Heun {t['steps']} steps | {_fmt(t['value'])} | – |")
    return lines


def _groups(rows: list[dict[str, Any]]) -> list[tuple[tuple[int, float], list[dict[str, Any]]]]:
    out: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((int(r["nfe"]), float(r["guidance"])), []).append(r)
    return list(out.items())


def _metrics_bullets(report: dict[str, Any]) -> list[str]:
    """Which metrics the report holds, what MMHM aggregates, and where MMHM and the main metric disagree."""
    names = ", ".join(report["metrics"])
    lines = [f"- metrics: {names} (first = main; every one is a key of each row's `metrics` in report.json)"]
    mm = report.get("mmhm")
    if not mm:
        return lines
    cell = "one (NFE, guidance) cell" if mm.get("group_by") == "nfe,guidance" else "one NFE"
    lines.append(f"- MMHM over {', '.join(mm['metrics'])}: min–max per metric across the rows of **{cell}** "
                 f"(lower-better metrics inverted), harmonic mean with ε = {mm['eps']:g}; bounds: {mm['bounds_source']}"
                 f". Compare MMHM within {cell} only.")
    return lines + [_agreement_line(report["metric"], mm.get("agreement") or [])]


def _agreement_line(main: str, agree: list[dict[str, Any]]) -> str:
    """``- FID vs MMHM: ...`` — the NFEs where the best rows differ, and Spearman's ρ of the rankings."""
    name = METRIC_NAMES.get(main, main)

    def at(a: dict[str, Any]) -> str:  # the NFE, and the guidance of a per-(NFE, guidance) cell
        return f"{a['nfe']}" + (f" (w={a['guidance']:g})" if a.get("guidance") is not None else "")

    same = [at(a) for a in agree if a["agree"]]
    diff = [a for a in agree if not a["agree"]]
    parts = []
    if diff:
        parts.append("best rows differ at " + "; ".join(
            f"NFE {at(a)} ({name}: {a['best_' + main]}, MMHM: {a['best_mmhm']})" for a in diff))
    if same:
        parts.append(f"agree at NFE {', '.join(same)}")
    rho = [f"{at(a)}: {a['spearman']:.2f}" for a in agree if a.get("spearman") is not None]
    if rho:
        parts.append(f"Spearman ρ({name} ranking, MMHM ranking) per NFE — {', '.join(rho)}")
    return f"- **{name} vs MMHM**: " + ("; ".join(parts) if parts else "no NFE with finite scores") + "."


def _table_head(nfes: list[int]) -> list[str]:
    return ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]


def _value_table(report: dict[str, Any]) -> list[str]:
    """Method × NFE values, best per column in bold, and the teacher's value as the last row."""
    labels, nfes, cells = grid_table(report)
    best = {}
    for n in nfes:
        vals = [(cells[(lab, n)], lab) for lab in labels if (lab, n) in cells and math.isfinite(cells[(lab, n)])]
        if vals:
            best[n] = _best(vals, report["metric"])
    lines = _table_head(nfes)
    for lab in labels:
        row = []
        for n in nfes:
            v = cells.get((lab, n))
            s = _fmt(v) if v is not None else "–"
            row.append(f"**{s}**" if best.get(n) == lab else s)
        lines.append(f"| {lab} | " + " | ".join(row) + " |")
    t = report.get("teacher")
    if t is not None and report["metric"] != "teacher":
        lines.append(f"| teacher (Heun {t['steps']} steps, NFE {t['nfe']}) | " + " | ".join(_fmt(t["value"]) for _ in nfes) + " |")
    return lines + ["", "Bold: best per column. "]


def _metric_cells(names: list[str], values: dict[str, Any], best: dict[str, str], label: str) -> str:
    cells = []
    for m in names:
        v = values.get(m)
        s = _fmt(v) if isinstance(v, (int, float)) else "–"
        cells.append(f"**{s}**" if best.get(m) == label else s)
    return " | ".join(cells)


def _nfe_metrics_table(report: dict[str, Any], nfe: int) -> list[str]:
    """Rows of one NFE × every listed metric; bold: best per column (teacher row not ranked)."""
    names = report["metrics"]
    rows = [r for r in report["results"] if int(r["nfe"]) == nfe]
    best = {}
    for m in names:
        vals = [(float(r["metrics"][m]), _label(report, r)) for r in rows
                if isinstance(r["metrics"].get(m), (int, float)) and math.isfinite(r["metrics"][m])]
        if vals:
            best[m] = _best(vals, m)
    arrow = {m: "↑" if _higher(m) else "↓" for m in names}
    head = "| method | " + " | ".join(f"{METRIC_NAMES.get(m, m)} {arrow[m]}" for m in names) + " |"
    lines = [f"### NFE {nfe}", "", head, "|---" * (len(names) + 1) + "|"]
    lines += [f"| {_label(report, r)} | " + _metric_cells(names, r["metrics"], best, _label(report, r)) + " |" for r in rows]
    t = report.get("teacher")
    if t is not None and t.get("metrics"):
        lines.append(f"| *teacher (NFE {t['nfe']})* | " + _metric_cells(names, t["metrics"], {}, "") + " |")
    return lines + [""]


def _metrics_tables(report: dict[str, Any]) -> list[str]:
    _, nfes, _ = grid_table(report)
    lines = ["", "## All metrics per NFE", "",
             "↓ lower is better, ↑ higher is better; **bold**: best row per column within the NFE. MMHM is "
             "relative to the rows of its NFE: compare it down a column, never across NFEs.", ""]
    for n in nfes:
        lines += _nfe_metrics_table(report, n)
    return lines[:-1]


def _psnr_table(report: dict[str, Any]) -> list[str]:
    labels, nfes, _ = grid_table(report)
    lines = ["", "## Fidelity to the teacher (same noises): PSNR in dB, higher is closer", "", *_table_head(nfes)]
    psnr = {(_label(report, r), int(r["nfe"])): r["extra"].get("teacher_psnr") for r in report["results"]}
    return lines + [f"| {lab} | " + " | ".join(_fmt(psnr.get((lab, n))) for n in nfes) + " |" for lab in labels]


def _timings_table(report: dict[str, Any]) -> list[str]:
    labels, nfes, _ = grid_table(report)
    lines = ["", "## Timings (seconds: table / sampling / metric)", "", *_table_head(nfes)]
    tim = {(_label(report, r), int(r["nfe"])): r["timings"] for r in report["results"]}
    for lab in labels:
        cellsf = []
        for n in nfes:
            tm = tim.get((lab, n))
            cellsf.append("–" if tm is None else f"{tm['table_seconds']:.1f} / {tm['sample_seconds']:.1f} / "
                                                f"{tm['metric_seconds']:.1f}")
        lines.append(f"| {lab} | " + " | ".join(cellsf) + " |")
    return lines


def _links(report: dict[str, Any]) -> list[str]:
    """Sample grids, warnings and the command that made the report."""
    lines: list[str] = []
    t = report.get("teacher")
    grids = [r for r in report["results"] if r.get("grid")]
    if grids:
        lines += ["", "## Samples (same noises in every grid)", ""]
        for tt in report.get("teachers") or [t]:  # one teacher per guidance scale in a guidance-list report
            if tt is not None and tt.get("grid"):
                w = f" (w={tt['guidance']:g})" if tt.get("guidance") is not None else ""
                lines.append(f"- teacher{w}: [{tt['grid']}]({tt['grid']})")
        lines += [f"- {_label(report, r)} NFE {r['nfe']}: [{r['grid']}]({r['grid']})" for r in grids]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    if report.get("command"):
        lines += ["", "## Command", "", "```", report["command"], "```"]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: the value table (what ``stepsmith eval`` prints), PSNR to the teacher, timings, links."""
    name = METRIC_NAMES.get(report["metric"], report["metric"])
    lines = _header(report, name) + _value_table(report)
    if report.get("guidance"):
        lines += _guidance_table(report)
    if report.get("metrics"):
        lines += _metrics_tables(report)
    if report.get("teacher") is not None:
        lines += _psnr_table(report)
    lines += _timings_table(report) + _links(report)
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = METRIC_NAMES.get(report["metric"], report["metric"])
    labels, nfes, cells = grid_table(report)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    positive = True
    for lab in labels:
        xs = [n for n in nfes if (lab, n) in cells]
        ys = [cells[(lab, n)] for n in xs]
        positive &= all(y > 0 for y in ys)
        ax.plot(xs, ys, marker="o", label=lab)
    t = report.get("teacher")
    if t is not None and report["metric"] != "teacher":
        ax.axhline(t["value"], color="k", ls="--", lw=1, label=f"teacher (NFE {t['nfe']})")
        positive &= t["value"] > 0
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel(f"{name} ({_better(report['metric'])} is better)")
    ax.set_title(f"{report['model']}: {name}, N={report['num']}", fontsize=10)
    ax.set_xticks(nfes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, path)


def _save_png(fig, path: str | Path) -> Path:
    """Lay out, write atomically as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "plot": out / "quality_vs_nfe.png"}
    atomic_write_json(paths["json"], _jsonable(report))
    atomic_write(paths["md"], markdown(report))
    plot(report, paths["plot"])
    if report.get("metrics"):
        paths["metrics_plot"] = plot_metrics(report, out / "metrics_vs_nfe.png")
    return paths


def plot_metrics(report: dict[str, Any], path: str | Path) -> Path:
    """``metrics_vs_nfe.png``: one panel per listed metric (MMHM included), one line per method,
    the teacher's value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["metrics"]
    labels, nfes, _ = grid_table(report)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, m in zip(axes.flat, names):
        _metric_panel(ax, report, m, labels, nfes)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{report['model']}: metrics vs NFE, N={report['num']}", fontsize=10)
    return _save_png(fig, path)


def _metric_panel(ax, report: dict[str, Any], m: str, labels: list[str], nfes: list[int]) -> None:
    vals = {(_label(report, r), int(r["nfe"])): r["metrics"].get(m) for r in report["results"]}
    for lab in labels:
        xs = [n for n in nfes if isinstance(vals.get((lab, n)), (int, float)) and math.isfinite(vals[(lab, n)])]
        ax.plot(xs, [vals[(lab, n)] for n in xs], marker="o", ms=3, label=lab)
    t = report.get("teacher")
    tv = (t or {}).get("metrics", {}).get(m)
    if isinstance(tv, (int, float)) and math.isfinite(tv):
        ax.axhline(tv, color="k", ls="--", lw=1, label="teacher")
    arrow = "↑" if _higher(m) else "↓"
    ax.set_title(f"{METRIC_NAMES.get(m, m)} {arrow}" + (" (per NFE)" if m == "mmhm" else ""), fontsize=9)
    ax.set_xticks(nfes)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- whole output folders

PRODUCTS = ("report.json", "report.md", "quality_vs_nfe.png", "metrics_vs_nfe.png", "grids")  # what a sweep writes
STAGING_TAG = "partial"


def staging_folder(out: str | Path) -> Path:
    """A fresh folder ``.<name>.partial-<pid>`` beside ``out`` where a sweep builds its outputs.

    Those of killed runs (their process gone) are removed first, so interruptions leave nothing
    behind for long.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out, (STAGING_TAG,))
    stage = out.with_name(f".{out.name}.{STAGING_TAG}-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def publish(stage: Path, out: str | Path) -> Path:
    """Move a finished sweep from ``stage`` into ``out``.

    A new ``out`` is ``stage`` renamed (whole or absent). Into an existing folder (which may hold
    other files) the old report goes first and the new ``report.json`` comes last, so a kill midway
    never leaves a report beside the grids of another run.
    """
    out = Path(out)
    if not out.exists():
        stage.rename(out)
        return out
    (out / "report.json").unlink(missing_ok=True)
    for name in PRODUCTS:
        old = out / name
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    for name in reversed(PRODUCTS):
        if (stage / name).exists():
            (stage / name).rename(out / name)
    shutil.rmtree(stage, ignore_errors=True)
    return out
