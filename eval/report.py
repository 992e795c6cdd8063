"""Write a sweep report: ``report.json``, ``report.md`` and ``quality_vs_nfe.png`` (atomic)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from schedules.io import atomic_path, atomic_write, atomic_write_json

METRIC_NAMES = {
    "fid": "FID",
    "kid": "KID",
    "wasserstein": "Wasserstein-2",
    "teacher": "MSE to teacher",
}


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == math.inf:
        return "inf"
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}" if a < 10 else f"{v:.2f}"


def grid_table(report: dict[str, Any]) -> tuple[list[str], list[int], dict[tuple[str, int], float]]:
    labels = list(dict.fromkeys(r["label"] for r in report["results"]))
    nfes = sorted({int(r["nfe"]) for r in report["results"]})
    cells = {(r["label"], int(r["nfe"])): float(r["value"]) for r in report["results"]}
    return labels, nfes, cells


def markdown(report: dict[str, Any]) -> str:
    name = METRIC_NAMES.get(report["metric"], report["metric"])
    labels, nfes, cells = grid_table(report)
    best = {}
    for n in nfes:
        vals = [(cells[(lab, n)], lab) for lab in labels if (lab, n) in cells and math.isfinite(cells[(lab, n)])]
        if vals:
            best[n] = min(vals)[1]
    lines = [f"# {name} vs NFE — {report['model']}", ""]
    real = report.get("real") or {}
    fn = real.get("feature_network")
    lines += [
        f"- metric: **{name}** (lower is better)" + (f", features `{fn['name']}` ({fn['num_features']}-d)" if fn else ""),
        f"- samples: N = {report['num']} generated per cell, all from the same noises "
        f"(`{report['eval_noise']}`)",
        f"- evaluation seed {report['eval_seed']}; search seeds {report['search_seeds'] or 'none (no searched tables)'}"
        f" — disjoint: {report['seeds_disjoint']}",
    ]
    if real:
        lines.append(f"- real data: {real.get('source')} (n = {real.get('n')})")
    lines.append(f"- solver: {report['solver']}; processes: {report['processes']}; total {report['seconds_total']:.1f} s")
    lines.append("")
    header = "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines += [header, "|---" * (len(nfes) + 1) + "|"]
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
    lines.append("")
    lines.append("Bold: best per column. ")
    if t is not None:
        lines += ["", "## Fidelity to the teacher (same noises): PSNR in dB, higher is closer", "",
                  header, "|---" * (len(nfes) + 1) + "|"]
        psnr = {(r["label"], int(r["nfe"])): r["extra"].get("teacher_psnr") for r in report["results"]}
        for lab in labels:
            lines.append(f"| {lab} | " + " | ".join(_fmt(psnr.get((lab, n))) for n in nfes) + " |")
    lines += ["", "## Timings (seconds: table / sampling / metric)", "", header, "|---" * (len(nfes) + 1) + "|"]
    tim = {(r["label"], int(r["nfe"])): r["timings"] for r in report["results"]}
    for lab in labels:
        cellsf = []
        for n in nfes:
            tm = tim.get((lab, n))
            cellsf.append("–" if tm is None else f"{tm['table_seconds']:.1f} / {tm['sample_seconds']:.1f} / "
                                                f"{tm['metric_seconds']:.1f}")
        lines.append(f"| {lab} | " + " | ".join(cellsf) + " |")
    grids = [r for r in report["results"] if r.get("grid")]
    if grids:
        lines += ["", "## Samples (same noises in every grid)", ""]
        if t is not None and t.get("grid"):
            lines.append(f"- teacher: [{t['grid']}]({t['grid']})")
        lines += [f"- {r['label']} NFE {r['nfe']}: [{r['grid']}]({r['grid']})" for r in grids]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    if report.get("command"):
        lines += ["", "## Command", "", "```", report["command"], "```"]
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
    ax.set_ylabel(f"{name} (lower is better)")
    ax.set_title(f"{report['model']}: {name}, N={report['num']}", fontsize=10)
    ax.set_xticks(nfes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    return paths


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
