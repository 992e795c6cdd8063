"""The main job, end to end, on the embedded default model.

    stepsmith quickstart --out runs/quickstart

1. search a dynamic-programming table for ``builtin:digits-flow`` at each NFE (search noises:
   seed 0);
2. plug every table into the real diffusers pipeline (:class:`UnconditionalFlowMatchPipeline`)
   with :func:`schedules.diffusers.pipeline_kwargs` — the pipeline, not stepsmith's
   own solver, draws the evaluation samples;
3. score FID (digits-features network) against the real digits for DP, uniform and Karras
   tables at equal NFE, on held-out noises (seed 10 000), and print the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from schedules.io import StepsmithError

DEFAULT_METHODS = ("dp", "uniform", "karras")
# A lighter DP than the library default (grid 100, 12 candidates, 4 sweeps, 64 samples) so the
# main job finishes in minutes on 2 CPU cores; measured on digits-flow NFE 4/6/8 it reaches the same
# search objective (final MSE vs teacher) within a few percent at about a quarter of the cost.
QUICK_DP_OPTIONS = {"grid": 60, "candidates": 6, "max_sweeps": 2}


def load_pipeline(model: str, adapter):
    """The model's diffusers pipeline (quiet), counting its denoiser calls on ``adapter.calls``."""
    from diffusers import DiffusionPipeline

    from schedules.embedded import embedded_path
    from schedules.pipeline import UnconditionalFlowMatchPipeline

    folder = embedded_path(model.split(":", 1)[1]) if model.startswith("builtin:") else Path(model)
    index = json.loads((folder / "model_index.json").read_text())
    pipe_cls = UnconditionalFlowMatchPipeline if index["_class_name"] == UnconditionalFlowMatchPipeline.__name__ \
        else DiffusionPipeline
    pipe = pipe_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # count the pipeline's own denoiser calls in the report (the adapter's counter is the report's source)
    pipe.unet.register_forward_pre_hook(lambda *_: setattr(adapter, "calls", adapter.calls + 1))
    return pipe


def search_tables(adapter, out: Path, methods: tuple[str, ...], nfe: tuple[int, ...], *, samples: int, seed: int,
                  dp_options: dict[str, Any], progress: bool) -> list:
    """Every method at every NFE (Euler), saved as ``out/tables/<method>-nfe<n>.json``."""
    from schedules.search import make_table

    tables = []
    for method in methods:
        for n in nfe:
            opts = dict(dp_options) if method == "dp" else {}
            table = make_table(adapter, method, n, "euler", samples=samples, seed=seed, progress=progress, **opts)
            table.save(out / "tables" / f"{method}-nfe{n}.json")
            tables.append(table)
    return tables


def run_quickstart(out: str | Path = "runs/quickstart", *, model: str = "builtin:digits-flow",
                   nfe: tuple[int, ...] = (4, 6, 8), methods: tuple[str, ...] = DEFAULT_METHODS, num: int = 512,
                   search_samples: int = 32, search_seed: int = 0, eval_seed: int = 10_000,
                   search_options: dict[str, Any] | None = None, progress: bool = True,
                   command: str = "stepsmith quickstart") -> dict[str, Any]:
    """Search → pipeline → FID. Returns the sweep report (also written under ``out``, with ``command``)."""
    from eval.sweep import run_sweep
    from schedules.adapters import load_model
    from schedules.diffusers import pipeline_kwargs

    out = Path(out)
    t0 = time.perf_counter()
    adapter = load_model(model)
    pipe = load_pipeline(model, adapter)
    # 1. search (and the baselines), saved as tables
    tables = search_tables(adapter, out, methods, nfe, samples=search_samples, seed=search_seed, progress=progress,
                           dp_options=QUICK_DP_OPTIONS if search_options is None else search_options)
    search_seconds = time.perf_counter() - t0

    # 2. the diffusers pipeline draws every sample, driven by the plugged table
    def pipeline_sampler(table, noise: torch.Tensor) -> torch.Tensor:
        kwargs = pipeline_kwargs(table, pipe)
        return pipe(batch_size=noise.shape[0], latents=noise, output_type="latent", **kwargs).images

    # 3. FID table on held-out noises
    report = run_sweep(adapter, tables=tables, num=num, seed=eval_seed, metric="fid", out=out, sampler=pipeline_sampler,
                       teacher=True, teacher_steps=20, progress=progress, command=command)
    report["quickstart"] = {"search_seconds": round(search_seconds, 1),
                            "total_seconds": round(time.perf_counter() - t0, 1),
                            "pipeline": type(pipe).__name__, "search_samples": search_samples}
    return report


def fid_table(report: dict[str, Any]) -> str:
    """Method × NFE FID table in Markdown, best per column in bold."""
    rows: dict[str, dict[int, float]] = {}
    for r in report["results"]:
        rows.setdefault(r["label"], {})[r["nfe"]] = r["value"]
    nfes = sorted({n for v in rows.values() for n in v})
    best = {n: min(v[n] for v in rows.values() if n in v) for n in nfes}
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for method, vals in rows.items():
        cells = [("**%.2f**" if vals[n] == best[n] else "%.2f") % vals[n] if n in vals else "–" for n in nfes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    teacher = report.get("teacher") or {}
    if "value" in teacher:
        lines.append(f"| teacher ({teacher.get('nfe', '?')} NFE) | " + " | ".join(f"{teacher['value']:.2f}" for _ in nfes) + " |")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    from schedules.cli import add_progress_arg

    p = sub.add_parser("quickstart", help="the main job on the embedded default: search → diffusers pipeline → FID table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:digits-flow", help="a builtin flow model or a FlowMatch pipeline folder")
    p.add_argument("--nfe", default="4,6,8", help="comma-separated NFE budgets")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--num", type=int, default=512, help="evaluation samples per cell")
    p.add_argument("--search-samples", type=int, default=32)
    p.add_argument("--out", default="runs/quickstart")
    add_progress_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    try:
        nfe = tuple(int(v) for v in args.nfe.split(","))
    except ValueError:
        raise StepsmithError(f"--nfe {args.nfe!r}: give comma-separated integers, e.g. 4,6,8") from None
    report = run_quickstart(args.out, model=args.model, nfe=nfe, methods=tuple(args.methods.split(",")), num=args.num,
                            search_samples=args.search_samples, progress=not args.no_progress,
                            command=args.invocation)
    q = report["quickstart"]
    print(f"\nFID (digits-features, N={args.num}, held-out seed {report['eval_seed']}) — samples drawn by "
          f"{q['pipeline']} with the plugged tables; lower is better\n")
    print(fid_table(report))
    print(f"\nsearch {q['search_seconds']} s, total {q['total_seconds']} s; tables, report.md, "
          f"quality_vs_nfe.png and grids in {args.out}/")
