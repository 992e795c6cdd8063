"""``stepsmith eval``: score tables or methods across NFE (FID / KID / Wasserstein / teacher MSE).

Writes ``report.json``, ``report.md``, ``quality_vs_nfe.png`` and ``grids/`` into ``--out``.
Scale out with ``accelerate launch --cpu --num_processes 2 -m schedules.cli eval ...``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from schedules.io import StepsmithError


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 2,4,6,8") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 2,4,6,8")
    return vals


def _str_list(text: str) -> list[str]:
    vals = [v for v in text.replace(" ", "").split(",") if v]
    if not vals:
        raise argparse.ArgumentTypeError("give at least one method, e.g. uniform,karras,dp")
    return vals


def register(sub) -> None:
    from schedules.cli import add_model_args

    p = sub.add_parser(
        "eval", help="score tables or methods across NFE: FID/KID/Wasserstein/teacher MSE, plots, grids",
        description="Sample every (method, NFE) from the same held-out noises and score it against real data "
                    "(FID/KID under a feature network, or the exact Wasserstein distance for 2D models) and "
                    "against the teacher (reference sampler). Writes report.json, report.md, quality_vs_nfe.png "
                    "and sample grids into --out.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tables", nargs="+", metavar="TABLE.json", help="stepsmith.schedule/v1 tables to score")
    src.add_argument("--methods", type=_str_list, help="comma-separated methods made with schedules.search "
                                                          "(e.g. uniform,karras,dp)")
    p.add_argument("--nfe", type=_int_list, default=[2, 4, 6, 8, 10], help="NFE budgets for --methods (default 2,4,6,8,10)")
    p.add_argument("--solver", default="euler", help="solver for --methods: euler|ddim|heun|dpmpp-2m (tables use theirs)")
    p.add_argument("--num", type=int, default=1000, help="generated samples per cell (default 1000)")
    p.add_argument("--metric", choices=["fid", "kid", "wasserstein", "teacher"], default=None,
                   help="default: fid for image models, wasserstein for 2D models")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=10_000, help="evaluation noise seed (must differ from search seeds)")
    p.add_argument("--real", default=None, help="real data: safetensors tensor [N, ...] or a folder of PNGs "
                                                "(default: the embedded model's data)")
    p.add_argument("--features", default=None,
                   help="feature network: digits-features (default for digits), inception, or path/to/file.py:attr")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file (never downloaded)")
    p.add_argument("--teacher-steps", type=int, default=50, help="Heun steps of the reference sampler (default 50)")
    p.add_argument("--no-teacher", action="store_true", help="skip the reference sampler (no teacher row / PSNR)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--grid", type=int, default=64, help="samples per grid image (0: no grids)")
    p.add_argument("--search-seed", type=int, default=0, help="noise seed for searched methods (default 0)")
    p.add_argument("--search-samples", type=int, default=None, help="samples for searched methods (default: theirs)")
    p.add_argument("--cache-dir", default=None, help="real-statistics cache (default $STEPSMITH_CACHE or ~/.cache/stepsmith)")
    p.add_argument("--no-cache", action="store_true", help="recompute real statistics")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from eval.sweep import current_dist, run_sweep
    from schedules.cli import model_from_args

    if args.teacher_steps < 1:
        raise StepsmithError("--teacher-steps must be at least 1")
    if args.batch_size < 1:
        raise StepsmithError("--batch-size must be at least 1")
    if "OMP_NUM_THREADS" not in __import__("os").environ and current_dist().world > 1:
        torch.set_num_threads(1)
    model = model_from_args(args)
    report = run_sweep(
        model, tables=args.tables, methods=args.methods, nfe=args.nfe, solver=args.solver, num=args.num,
        metric=args.metric, out=args.out, seed=args.seed, real=args.real, features=args.features,
        inception_weights=args.inception_weights, teacher=not args.no_teacher, teacher_steps=args.teacher_steps,
        batch_size=args.batch_size, grid=args.grid, cache=args.cache_dir, use_cache=not args.no_cache,
        search_seed=args.search_seed, search_samples=args.search_samples,
        command=getattr(args, "invocation", None) or "stepsmith " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if current_dist().main:
        from eval.report import markdown

        print(markdown(report).split("\n## ")[0])
        print(json.dumps({"out": args.out, "metric": report["metric"], "num": report["num"],
                          "seconds": report["seconds_total"]}))
