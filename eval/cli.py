"""``stepsmith eval``: score tables or methods across NFE (FID / KID / Wasserstein / teacher MSE, and
with a ``--metric`` list precision / recall / density / coverage / IS / MMHM from the same samples).

Writes ``report.json``, ``report.md``, ``quality_vs_nfe.png`` and ``grids/`` into ``--out`` (and
``metrics_vs_nfe.png`` for a metric list).
Scale out with ``accelerate launch --cpu --num_processes 2 -m schedules.cli eval ...``.
"""

from __future__ import annotations

import argparse
import json
import os

from schedules.io import StepsmithError, check_output_path


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 2,4,6,8") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 2,4,6,8")
    return vals


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,3,5") from None
    if not vals:
        raise argparse.ArgumentTypeError("give at least one guidance scale, e.g. 1,3,5")
    return vals


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` → (key, int | float | bool | str), as ``stepsmith search --option`` reads it."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} must look like key=value (e.g. grid=60)")
    key, val = text.split("=", 1)
    for cast in (int, float):
        try:
            return key.strip().replace("-", "_"), cast(val)
        except ValueError:
            pass
    return key.strip().replace("-", "_"), (val.lower() == "true") if val.lower() in ("true", "false") else val


def _str_list(text: str) -> list[str]:
    vals = [v for v in text.replace(" ", "").split(",") if v]
    if not vals:
        raise argparse.ArgumentTypeError("give at least one method, e.g. uniform,karras,dp")
    return vals


def register(sub) -> None:
    from schedules.cli import add_model_args, add_progress_arg

    p = sub.add_parser(
        "eval", help="score tables or methods across NFE: FID/KID/Wasserstein/teacher MSE, plots, grids",
        description="Sample every (method, NFE) from the same held-out noises and score it against real data "
                    "(FID/KID under a feature network, or the exact Wasserstein distance for 2D models) and "
                    "against the teacher (reference sampler). Writes report.json, report.md, quality_vs_nfe.png "
                    "and sample grids into --out.")
    add_model_args(p, conditional=True)
    for action in p._actions:  # eval only: --guidance takes a comma list (one set of rows per scale)
        if action.dest == "guidance":
            action.type = _float_list
            action.help = ("classifier-free guidance scale(s) w ≥ 0, a comma list such as 1,3,5: every (method, NFE) "
                           "at every scale, on the same noises and conditions (default: 1, no guidance)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tables", nargs="+", metavar="TABLE.json", help="stepsmith.schedule/v1 tables to score")
    src.add_argument("--methods", type=_str_list, help="comma-separated methods made with schedules.search "
                                                          "(e.g. uniform,karras,dp)")
    p.add_argument("--nfe", type=_int_list, default=[2, 4, 6, 8, 10], help="NFE budgets for --methods (default 2,4,6,8,10)")
    p.add_argument("--solver", default="euler", help="solver for --methods: euler|ddim|heun|dpmpp-2m|ipndm|unipc (tables use theirs)")
    p.add_argument("--num", type=int, default=1000, help="generated samples per cell (default 1000)")
    p.add_argument("--metric", default=None,
                   help="main metric fid|kid|wasserstein|teacher (default: fid for image models, wasserstein for 2D "
                        "models), or a comma list whose first name is the main one, from fid,kid,wasserstein,"
                        "teacher,precision,recall,density,coverage,is,class-accuracy,clip,mmhm (mmhm aggregates "
                        "the others, per NFE); each name is a key of every row's `metrics` in report.json")
    p.add_argument("--clip-model", default=None, metavar="DIR",
                   help="local transformers CLIPModel folder (with its processor) for --metric clip; never downloaded")
    p.add_argument("--bounds", default=None, metavar="FILE",
                   help="frozen MMHM bounds (from --save-bounds) so MMHM scores of different runs compare")
    p.add_argument("--save-bounds", default=None, metavar="FILE", help="write the MMHM bounds this run used")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=10_000, help="evaluation noise seed (must differ from search seeds)")
    p.add_argument("--real", default=None, help="real data: safetensors tensor [N, ...] or a folder of PNG/JPEG images, "
                                                "resized to the model (default: the embedded model's data)")
    p.add_argument("--features", default=None,
                   help="feature network: digits-features (default for digits), inception, or path/to/file.py:attr")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file (never downloaded)")
    p.add_argument("--teacher-steps", type=int, default=50, help="Heun steps of the reference sampler (default 50)")
    p.add_argument("--no-teacher", action="store_true", help="skip the reference sampler (no teacher row / PSNR)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--grid", type=int, default=64, help="samples per grid image (0: no grids)")
    p.add_argument("--search-seed", type=int, default=0, help="noise seed for searched methods (default 0)")
    p.add_argument("--search-samples", type=int, default=None, help="samples for searched methods (default: theirs)")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="option of the searched methods (not baselines), repeatable; e.g. the quickstart's lighter "
                        "dp: --option grid=60 --option candidates=6 --option max_sweeps=2")
    p.add_argument("--cache-dir", default=None, help="real-statistics cache (default $STEPSMITH_CACHE or ~/.cache/stepsmith)")
    p.add_argument("--no-cache", action="store_true", help="recompute real statistics")
    p.add_argument("--allow-other-model", action="store_true",
                   help="score --tables searched for another model (e.g. the same model copied elsewhere)")
    add_progress_arg(p)
    p.set_defaults(func=run)


def sweep_config(args: argparse.Namespace):
    """The :class:`~eval.sweep.SweepConfig` of the parsed options; the command line is ``args.invocation``."""
    from eval.sweep import SweepConfig

    if args.teacher_steps < 1:
        raise StepsmithError("--teacher-steps must be at least 1")
    if args.batch_size < 1:
        raise StepsmithError("--batch-size must be at least 1")
    check_output_path(args.out, param="out", folder=True)  # before the model loads
    if args.tables:  # the tables' model, also before the model loads
        from schedules.adapters import check_table_model
        from schedules.table import load_table

        for t in args.tables:
            check_table_model(load_table(t).model, args.model, allow_other_model=args.allow_other_model)
    if args.metric and "teacher" in args.metric.replace(" ", "").split(",") and args.no_teacher:
        raise StepsmithError("--metric teacher needs the reference sampler; drop --no-teacher")
    if args.metric and "clip" in args.metric.replace(" ", "").split(","):  # before the model loads
        from eval.clip_score import check_clip_folder

        check_clip_folder(args.clip_model)
    return SweepConfig(
        tables=args.tables, methods=args.methods, nfe=args.nfe, solver=args.solver, num=args.num,
        metric=args.metric, out=args.out, seed=args.seed, real=args.real, features=args.features,
        inception_weights=args.inception_weights, teacher=not args.no_teacher, teacher_steps=args.teacher_steps,
        batch_size=args.batch_size, grid=args.grid, cache=args.cache_dir, use_cache=not args.no_cache,
        search_seed=args.search_seed, search_samples=args.search_samples, command=args.invocation,
        search_options=dict(args.option) or None, bounds=args.bounds, save_bounds=args.save_bounds,
        allow_other_model=args.allow_other_model, guidance=args.guidance, clip_model=args.clip_model,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> None:
    import torch

    from eval.sweep import run_sweep
    from schedules.cli import model_from_args
    from schedules.distributed import current_dist

    cfg = sweep_config(args)
    if cfg.guidance is not None:  # the model loads at the first scale; the sweep rebuilds it at each one
        args = argparse.Namespace(**{**vars(args), "guidance": cfg.guidance[0]})
    if "OMP_NUM_THREADS" not in os.environ and current_dist().world > 1:
        torch.set_num_threads(1)
    report = run_sweep(model_from_args(args), cfg)
    if current_dist().main:
        from eval.report import markdown

        print(markdown(report).split("\n## ")[0])
        print(json.dumps({"out": args.out, "metric": report["metric"], "num": report["num"],
                          "seconds": report["seconds_total"]}))
