"""BENCHMARKS.md and the P2 figure, rendered from a suite result (``bench.json``).

Pure functions of the result dict, so ``stepsmith bench --render`` rewrites the Markdown of an
earlier run byte for byte without measuring anything.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from eval.sweep_metrics import agreement, first_best, same_score

COST_TARGET = 2.5  # the default dp search's budget in reference passes (issue 12, item 4); the dp-max-cost row's cap

SEARCH_METHODS = ("dp", "evolution", "ays", "olss")  # a row made by one of these is a searched row
PUBLISHED_DP = ("dp-boss", "dp-gits", "dp-oss")  # the published DP algorithms as rows of the suite
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace", "default")  # what a diffusers user gets without stepsmith


def searched_labels(report: dict[str, Any]) -> set[str]:
    """The rows of a sweep report made by a search (any label; bench.json files before row labels: by method)."""
    return {r["label"] for r in report["results"] if r.get("method") in SEARCH_METHODS}


def teacher_gap(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """P2: per NFE, (uniform - best) / (uniform - teacher), and which table is best."""
    rep = result["report"]
    teacher = rep["teacher"]["value"]
    gap: dict[int, dict[str, Any]] = {}
    for n in rep["nfe"]:
        rows = [r for r in rep["results"] if r["nfe"] == n]
        uni = next((r["value"] for r in rows if r["label"] == "uniform"), None)
        best = first_best(rows, lambda r: -r["value"])  # one table in two rows (same scores): the first row
        frac = None if uni is None or uni == teacher else (uni - best["value"]) / (uni - teacher)
        gap[n] = {"uniform": uni, "best": best["value"], "best_label": best["label"], "teacher": teacher,
                  "closed": None if frac is None else round(frac, 4)}
    return gap


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}"


def _rel(path: Path, md_dir: Path) -> str:
    return os.path.relpath(path, md_dir).replace(os.sep, "/")


def plot_gap(quality: list[dict[str, Any]], path: Path) -> Path:
    """P2 figure: share of the uniform → teacher gap closed by the best table, per config and NFE."""
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


def _header(result: dict[str, Any]) -> list[str]:
    m, cfg = result["machine"], result["config"]
    return ["# stepsmith benchmarks", "",
            f"Written by `{result['command']}` on {result['date']} in {result['seconds']:.0f} s"
            + (" — **reduced preset (CI smoke run): numbers are not meaningful**" if result["reduced"] else "") + ".",
            "", f"- machine: {m['platform']}, {m['cpus']} CPUs, torch threads {m['threads']}, no GPU",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
            f"- tables searched on noise seed 0 with {cfg['search_samples']} search samples; every "
            f"cell evaluated on held-out noise seed 10 000 (N = {cfg['num']} per cell"
            + "".join(f", {k} {v}" for k, v in (cfg.get("num_of") or {}).items()) + ", the same noises "
            f"for every row); teacher = Heun, {cfg['teacher_steps']} steps, same noises",
            "- NFE = network evaluations per sample (Heun: 2K-1, DPM++(2M): K, Euler/DDIM: K); the final jump to "
            "σ = 0 is a step and counts", ""]


def _cell(v: float | None, kid: float | None, best: float) -> str:
    if v is None:
        return "–"
    s = _fmt(v) + (f" ({kid:.3g})" if kid is not None else "")
    return f"**{s}**" if same_score(v, best) else s


def _ratio_rows(labels: list[str], nfes: list[int], cells: dict[tuple[str, int], float],
                searched: set[str]) -> list[str]:
    """Best searched table ÷ best baseline, ÷ the diffusers default schedule, and (where those rows
    exist) the default dp ÷ the best published DP algorithm and ÷ dp on the old teacher-mse objective."""
    def best_of(names) -> dict[int, float | None]:
        return {n: min((cells[(lab, n)] for lab in names if (lab, n) in cells), default=None) for n in nfes}

    searched_best = best_of(searched)
    rows = [("best searched ÷ best baseline", searched_best, best_of([lab for lab in labels if lab not in searched])),
            ("best searched ÷ diffusers default", searched_best, {n: cells.get(("default", n)) for n in nfes})]
    dp = {n: cells.get(("dp", n)) for n in nfes}
    if "dp" in labels:
        rows.append(("dp ÷ best diffusers spacing (leading, trailing, linspace, default)", dp, best_of(DIFFUSERS_SPACINGS)))
    if any(lab in labels for lab in PUBLISHED_DP):
        rows.append(("dp ÷ best published DP (boss, gits, oss)", dp, best_of(PUBLISHED_DP)))
    for other in ("dp-teacher-mse", "dp-data-fid", "dp-max-cost"):
        if other in labels:
            rows.append((f"dp ÷ {other}", dp, {n: cells.get((other, n)) for n in nfes}))

    def ratio(num: dict, den: dict) -> str:
        return " | ".join(_fmt(num[n] / den[n], 3) if num[n] and den[n] else "–" for n in nfes)

    return ["", "| | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|",
            *(f"| {name} | {ratio(num, den)} |" for name, num, den in rows)]


def _below_teacher(rep: dict[str, Any], guided: bool) -> list[str]:
    """Rows that score clearly better than the many-step teacher itself, with their distance to the teacher's samples:
    a few-step table cannot beat the sampler it approximates except by sampling another distribution."""
    t = rep["teacher"]["value"]
    rows = [r for r in rep["results"] if r["value"] < 0.9 * t and "teacher_mse" in r.get("extra", {})]
    if not rows or not rep.get("lower_is_better", True):
        return []
    ref_label = "dp"
    dp = {int(r["nfe"]): r["extra"].get("teacher_mse") for r in rep["results"] if r["label"] == ref_label}
    lines = ["", f"Rows scoring below the teacher's own {_fmt(t)} (mean squared distance to the teacher's samples from the "
             f"same noises, and ÷ {ref_label}'s):"]
    for r in sorted(rows, key=lambda r: (r["label"], r["nfe"])):
        d, ref = r["extra"]["teacher_mse"], dp.get(int(r["nfe"]))
        lines.append(f"- {r['label']} NFE {r['nfe']}: {_fmt(r['value'])}, distance {d:.3g}"
                     + (f" ({d / ref:.1f}× {ref_label})" if ref else ""))
    if guided:
        lines.append("Against unguided real data, a guided model's FID rewards undoing part of the guidance (and, in "
                     "this feature network, residual noise): such rows do not reproduce the guided sampler (the teacher "
                     "distance says so, and the FID to the teacher below); dp-data-fid is dp searched on FID against the data itself.")
    return lines


def _fid_to_teacher(rep: dict[str, Any], labels: list[str], nfes: list[int], searched: set[str]) -> list[str]:
    """The table × NFE grid of ``fid-teacher`` (FID against the teacher's samples from the same noises) with its ratio
    rows, where the run measured it: for a guided model the distance a schedule can close (eval.sweep_metrics)."""
    cells = {(r["label"], int(r["nfe"])): r["metrics"]["fid-teacher"] for r in rep["results"]
             if "fid-teacher" in (r.get("metrics") or {})}
    if not cells:
        return []
    best = {n: min(v for (_, m), v in cells.items() if m == n) for n in nfes}
    lines = ["", "FID to the teacher (lower is better): FID against the teacher's own samples from the same noises, "
             "under the same feature network — the distance to the guided sampler's distribution, which a schedule can "
             "close (the teacher is 0 here):", "", "| table | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---" * (len(nfes) + 1) + "|"]
    for lab in labels:
        row = [_cell(cells.get((lab, n)), None, best[n]) for n in nfes]
        lines.append(f"| {f'*{lab}*' if lab in searched else lab} | " + " | ".join(row) + " |")
    return lines + _ratio_rows(labels, nfes, cells, searched)


def _final_jumps(rep: dict[str, Any], searched: set[str], nfes: list[int]) -> list[str]:
    """The last evaluated σ of every searched table and the share of the noise range its final jump crosses."""
    rows = {(r["label"], int(r["nfe"])): r for r in rep["results"] if r["label"] in searched and r.get("sigmas")}
    if not rows:
        return []
    lines = ["", "Last evaluated σ of each searched table (in brackets: t_last ÷ t_first, the share of the noise range "
             "the final jump to σ = 0 crosses in one evaluation — long final jumps average, i.e. blur):", "",
             "| table | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for lab in dict.fromkeys(k[0] for k in rows):
        cells = []
        for n in nfes:
            r = rows.get((lab, n))
            if r is None:
                cells.append("–")
                continue
            t = r["timesteps"]
            frac = f" ({t[-1] / t[0]:.2f})" if t and t[0] > 0 else ""
            cells.append(f"{r['sigmas'][-2]:.3g}{frac}")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def _manifold(rep: dict[str, Any], labels: list[str], nfes: list[int], searched: set[str]) -> list[str]:
    """MMHM with improved precision / recall per row, and where the FID and MMHM rankings disagree."""
    vals = {(r["label"], int(r["nfe"])): r.get("metrics") or {} for r in rep["results"]}
    if not any("mmhm" in m for m in vals.values()):
        return []
    info = rep.get("mmhm") or {}
    best = {n: max((m["mmhm"] for (_, k), m in vals.items() if k == n and math.isfinite(m.get("mmhm", math.nan))),
                   default=None) for n in nfes}
    lines = ["", f"MMHM (higher is better; harmonic mean of the min–max normalised {', '.join(info.get('metrics', []))}"
             f", bounds from the rows of each NFE column) with improved precision / recall (k = 3) in brackets:", "",
             "| table | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for lab in labels:
        cells = []
        for n in nfes:
            m = vals.get((lab, n))
            if not m or "mmhm" not in m:
                cells.append("–")
                continue
            c = f"{m['mmhm']:.3f} ({m.get('precision', float('nan')):.2f} / {m.get('recall', float('nan')):.2f})"
            cells.append(f"**{c}**" if same_score(m["mmhm"], best[n]) else c)
        lines.append(f"| {f'*{lab}*' if lab in searched else lab} | " + " | ".join(cells) + " |")
    # derived from the rows as spliced (ties go to the earlier row), not read from the run that scored them
    agree = agreement([r for r in rep["results"] if r.get("metrics")], rep["metric"]) if info.get("agreement") else []
    if agree:
        main = rep["metric"]
        lines += ["", "| ranking | " + " | ".join(f"NFE {a['nfe']}" for a in agree) + " |",
                  "|---" * (len(agree) + 1) + "|",
                  f"| best by {main} | " + " | ".join(str(a["best_" + main]) for a in agree) + " |",
                  "| best by MMHM | " + " | ".join(str(a["best_mmhm"]) for a in agree) + " |",
                  f"| Spearman ρ ({main} vs MMHM ranking) | "
                  + " | ".join(_fmt(a["spearman"], 3) for a in agree) + " |"]
        differ = [a["nfe"] for a in agree if not a["agree"]]
        lines += ["", f"The best table by {main} and by MMHM differ at NFE {', '.join(map(str, differ))}." if differ
                  else f"The best table by {main} and by MMHM agree at every NFE."]
    return lines


def _quality_config(res: dict[str, Any], out: Path, md_dir: Path) -> list[str]:
    """P1 for one config: the table × NFE grid with the teacher row, the ratio rows and the figure."""
    from eval.report import METRIC_NAMES, grid_table

    rep = res["report"]
    labels, nfes, cells = grid_table(rep)
    searched = searched_labels(rep)
    kid = {(r["label"], r["nfe"]): r["extra"].get("kid") for r in rep["results"]}
    best = {n: min(cells[(lab, n)] for lab in labels if (lab, n) in cells) for n in nfes}
    metric = METRIC_NAMES.get(rep["metric"], rep["metric"])
    cond = res.get("conditioning")
    at = f", classes {cond['classes']}, guidance {cond['guidance']:g}" if cond else ""
    lines = [f"### {res['name']} — {metric}, solver {res['solver']}{at}", "",
             "| table | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for lab in labels:
        row = [_cell(cells.get((lab, n)), kid.get((lab, n)), best[n]) for n in nfes]
        name = f"*{lab}*" if lab in searched else lab
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    t = rep["teacher"]
    tk = t.get("extra", {}).get("kid")
    tv = _fmt(t["value"]) + (f" ({tk:.3g})" if tk is not None else "")
    lines.append(f"| teacher (Heun NFE {t['nfe']}) | " + " | ".join(tv for _ in nfes) + " |")
    if res["skipped_baselines"]:
        lines.append("")
        lines.append("Not applicable here: " + "; ".join(f"`{b}` ({why})" for b, why in res["skipped_baselines"].items()))
    lines += _ratio_rows(labels, nfes, cells, searched)
    lines += _below_teacher(rep, cond is not None)
    lines += _fid_to_teacher(rep, labels, nfes, searched)
    lines += _manifold(rep, labels, nfes, searched)
    acc = {(r["label"], int(r["nfe"])): (r.get("metrics") or {}).get("class-accuracy") for r in rep["results"]}
    if any(v is not None for v in acc.values()):
        lo = min(v for v in acc.values() if v is not None)
        lines += ["", f"Class accuracy of the intended class (digits classifier): lowest cell {lo:.3f}."]
    lines += _final_jumps(rep, searched, nfes)
    plot = out / "p1" / res["name"] / "quality_vs_nfe.png"
    return lines + ["", f"![{res['name']}]({_rel(plot, md_dir)})", ""]


def _quality(quality: list[dict[str, Any]], out: Path, md_dir: Path) -> list[str]:
    lines = ["## P1 — quality vs NFE", "",
             "Lower is better; **bold** = best per column. Images: FID (KID in brackets) on the model's own 128-d "
             "feature network (digits-features; sharp-features for the binary sharp digits) against its real data "
             "(N is small, so FID is biased upward: compare rows, not papers). 2-D: exact Wasserstein-2 (POT) "
             "against true samples. *Italic* rows are searched: `dp` is stepsmith's default (objective auto: "
             "feature-mse on models with a feature network), `dp-teacher-mse` the same search on the final mse, "
             f"`dp-max-cost` the same search stopped at {COST_TARGET:g} reference passes "
             f"(`--option max_cost={COST_TARGET:g}`), "
             "`dp-boss` / `dp-gits` / `dp-oss` the published DP algorithms as their authors define them.", ""]
    for res in quality:
        lines += _quality_config(res, out, md_dir)
    return lines


def _gap(quality: list[dict[str, Any]], nfes: list[int], out: Path, md_dir: Path) -> list[str]:
    lines = ["## P2 — share of the uniform → teacher gap closed by the best table", "",
             "(uniform − best) ÷ (uniform − teacher); 100% = the best table at this NFE scores like the teacher.",
             "", "| config | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for res in quality:
        g = teacher_gap(res)
        lines.append(f"| {res['name']} | " + " | ".join(
            "–" if g.get(n, {}).get("closed") is None else f"{100 * g[n]['closed']:.0f}% ({g[n]['best_label']})"
            for n in nfes) + " |")
    return lines + ["", f"![P2]({_rel(out / 'p2_gap_closed.png', md_dir)})", ""]


def _search_cost(quality: list[dict[str, Any]]) -> list[str]:
    lines = ["## P3 — search cost", "",
             "Model calls are batched network evaluations (batch = search samples). Peak MB = growth of the "
             "process's resident memory above its level at the start of the search (memory freed by an earlier "
             "search and reused reads as 0). `dp ÷ ref` = cost-accumulation seconds ÷ reference-pass "
             "seconds; `search ÷ ref` = the whole search (teacher DP, student DP, final-error refinement) ÷ "
             "reference-pass seconds.", "",
             "| config | method | NFE | model calls | seconds | peak MB | dp ÷ ref | search ÷ ref |",
             "|---|---|---|---|---|---|---|---|"]
    for res in quality:
        for c in res["costs"]:
            if "skipped" in c:
                lines.append(f"| {res['name']} | {c['method']} | {c['nfe']} | – | – | – | – | not run: {c['skipped']} |")
                continue
            lines.append(f"| {res['name']} | {c['method']} | {c['nfe']} | {c['model_calls']} | {c['seconds']:.1f} | "
                         f"{_fmt(c['peak_rss_mb'], 3)} | {_fmt(c.get('dp_over_reference'), 3)} | "
                         f"{_fmt(c.get('search_over_reference'), 3)} |")
    return lines + [""] + _cost_target(quality)


COST_ROWS = ("dp", "dp-max-cost", "olss")


def _cost_target(quality: list[dict[str, Any]]) -> list[str]:
    """Search cost beside held-out quality for the default dp, the same search capped at :data:`COST_TARGET`
    reference passes and olss, per config and NFE, and how many default-dp cells keep to the target."""
    from eval.report import grid_table

    lines = [f"**Search cost beside held-out quality** (target: default dp ≤ {COST_TARGET:g}× its reference pass). "
             "Each cell: search ÷ reference pass, then the held-out P1 metric of that cell.", "",
             "| config | NFE | " + " | ".join(COST_ROWS) + " |", "|---|---|" + "---|" * len(COST_ROWS)]
    met, missed = 0, []
    for res in quality:
        _, _, cells = grid_table(res["report"])
        cost = {(c["method"], str(c["nfe"])): c.get("search_over_reference") for c in res["costs"] if "skipped" not in c}
        for nfe in res["report"]["nfe"]:
            row = [(cost.get((m, str(nfe))), cells.get((m, nfe))) for m in COST_ROWS]
            if all(r is None for r, _ in row):
                continue
            dp_ratio = row[0][0]
            if dp_ratio is not None:
                if dp_ratio <= COST_TARGET:
                    met += 1
                else:
                    missed.append(f"{res['name']} NFE {nfe} ({dp_ratio:.3g}×)")
            lines.append(f"| {res['name']} | {nfe} | " + " | ".join(
                "–" if r is None else f"{_fmt(r, 3)}× · {_fmt(v)}" for r, v in row) + " |")
    total = met + len(missed)
    if not total:
        return []
    lines += ["", f"Default dp at ≤ {COST_TARGET:g} reference passes: {met} of {total} cells."
              + (f" Over it: {'; '.join(missed)}." if missed else ""), ""]
    return lines


def _overhead(overhead: list[dict[str, Any]]) -> list[str]:
    lines = ["## P4 — run-time cost of a plugged table", "",
             "Same pipeline, same seed, equal NFE; default schedule vs `pipe(**pipeline_kwargs(table, pipe))`, "
             "interleaved repeats, median wall time.", "",
             "| pipeline | NFE | batch | repeats | UNet calls default / plugged | median s default | median s plugged "
             "| ratio | pipeline_kwargs ms |", "|---|---|---|---|---|---|---|---|---|"]
    for o in overhead:
        lines.append(f"| {o['pipeline']} | {o['nfe']} | {o['batch']} | {o['repeats']} | "
                     f"{o['unet_calls']['default']} / {o['unet_calls']['plugged']} | {o['median_s']['default']} | "
                     f"{o['median_s']['plugged']} | **{o['ratio_plugged_over_default']}** | {o['pipeline_kwargs_ms']} |")
    return lines + [""]


def _straightening(distill: dict[str, Any], config: dict[str, Any] | list[str]) -> list[str]:
    import shlex

    from benchmarks.distill import DistillBenchConfig, cli_command, markdown
    from benchmarks.options import config_from_dict

    if isinstance(config, list):  # bench.json written before the config became a dataclass: its flags
        command = shlex.join(["python", "-m", "benchmarks.distill", *config])
    else:
        command = cli_command(config_from_dict(DistillBenchConfig, config))
    return ["## P5 — straightening: BOSS vs reflow vs k-step at equal budget", "",
            f"`{command}`: every student gets the same "
            "teacher trajectories, optimizer steps, batch size and learning rate. Cells: metric "
            "(L2 distance to the teacher's sample from the same noise).", "", markdown(distill), ""]


def markdown(result: dict[str, Any], md_dir: Path) -> str:
    """BENCHMARKS.md for a suite result; figure links are relative to ``md_dir``."""
    out, parts = Path(result["out"]), result["config"]["parts"]
    lines = _header(result)
    quality = result.get("quality") or []
    if quality:
        lines += _quality(quality, out, md_dir)
    if "p2" in parts and quality:
        lines += _gap(quality, result["config"]["nfe"], out, md_dir)
    if "p3" in parts and quality:
        lines += _search_cost(quality)
    if result.get("overhead"):
        lines += _overhead(result["overhead"])
    if result.get("distill"):
        lines += _straightening(result["distill"], result["config"]["distill"])
    return "\n".join(lines) + "\n"
