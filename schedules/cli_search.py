"""``stepsmith search``: build a timestep table for a model, a solver and an NFE budget."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from schedules.io import StepsmithError, check_output_path


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise StepsmithError(f"--option {text!r} must look like key=value (e.g. mode=teacher, shift=3)")
    key, val = text.split("=", 1)
    key = key.strip().replace("-", "_")
    for cast in (int, float):
        try:
            return key, cast(val)
        except ValueError:
            pass
    if val.lower() in ("true", "false"):
        return key, val.lower() == "true"
    return key, val


def _parse_nfe(text: str) -> list[int]:
    """``--nfe 6`` or ``--nfe 4,6,8,10`` → the budgets."""
    try:
        out = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise StepsmithError(f"`nfe` {text!r}: give an integer or a comma list (4,6,8)", param="nfe") from None
    if not out:
        raise StepsmithError("`nfe` needs at least one budget", param="nfe")
    return out


def _write_folder(out: str, tables: dict) -> list[str]:
    """Every table as ``out/<method>-nfe<K>.json``, built in a sibling folder and renamed into place."""
    dst = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        names = []
        for nfe, t in tables.items():
            names.append(f"{t.method}-nfe{nfe}.json")
            t.save(tmp / names[-1])
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
        tmp.rename(dst)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [str(dst / n) for n in names]


def _check_folder(out: str, overwrite: bool) -> None:
    path = check_output_path(out, param="out", folder=True)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise StepsmithError(f"`out` folder {path} exists and holds files; pass --overwrite to replace it",
                             param="out")
    path.parent.mkdir(parents=True, exist_ok=True)


def register(sub: argparse._SubParsersAction) -> None:
    from schedules.cli import add_model_args, add_progress_arg

    p = sub.add_parser("search", help="search (or generate) a timestep table",
                       description="Search a timestep table for a model, solver and NFE budget, or generate a "
                                   "baseline schedule. The table is written atomically as stepsmith.schedule/v1 JSON.")
    add_model_args(p, conditional=True)
    p.add_argument("--method", default="dp",
                   help="dp (default), evolution, ays, olss, interp, or a baseline: uniform, quadratic, karras, exponential, logsnr, "
                        "shift, linspace, leading, trailing, default, ays-gaussian, ays-published")
    p.add_argument("--nfe", required=True,
                   help="model evaluations (Heun: 2K-1 for K steps, so odd); a list 4,6,8 writes one table per "
                        "budget into the --out folder (dp: all from one pass)")
    p.add_argument("--solver", default=None, help="euler (default) | ddim | heun | dpmpp-2m | ipndm | unipc "
                                                  "(interp: the source table's solver)")
    p.add_argument("--from", dest="source", default=None, metavar="TABLE",
                   help="--method interp: the table to interpolate log-linearly to --nfe")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (several budgets)")
    p.add_argument("--samples", type=int, default=None, help="search samples B (default 64)")
    p.add_argument("--grid", type=int, default=None, help="grid intervals for dp/evolution (default 100; heun 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the search samples (evaluate on others)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (dp: mode=refined|teacher|student, late_weight=1.15, checkpoint=PATH; "
                        "karras: rho=7; shift: shift=3; evolution: generations=10, checkpoint=PATH; ays: checkpoint=PATH, ...)")
    p.add_argument("--objective", default=None,
                   help="dp/evolution: what the search minimises on its samples against the teacher's: auto (default: "
                        "feature-mse when the model has a feature network or --features is given, else teacher-mse), "
                        "teacher-mse, feature-mse, kid, fid, wasserstein (feature space with a feature network); "
                        "data-kid, data-fid, data-wasserstein: against real data (--data) instead of the teacher")
    p.add_argument("--features", default=None, metavar="builtin:NAME",
                   help="feature network of --objective kid|fid|feature-mse|wasserstein (builtin:sharp-features, "
                        "builtin:digits-features; embedded models default to their own)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="--method ays: data samples x0 of the KLUB (.safetensors tensor [N, ...] or a folder of PNG/JPEG images; "
                        "embedded models default to their own data); --objective data-*: the real data compared with "
                        "(.safetensors tensor [N, ...] in the model's range, or a folder of PNG/JPEG images, scaled to "
                        "[-1, 1] and resized to the model's size; at least --samples of them)")
    add_progress_arg(p)
    p.add_argument("--out", required=True, help="JSON table to write (several budgets: the folder to write)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from schedules.cli import model_from_args
    from schedules.distributed import current_dist
    from schedules.search import SEARCHED, check_request, make_tables
    from schedules.table import load_table

    args.nfe = _parse_nfe(args.nfe)
    options = dict(_parse_option(o) for o in args.option)
    if args.grid is not None:
        options["grid"] = args.grid
    if args.objective is not None:
        options["objective"] = args.objective
    if args.features is not None:
        if args.objective is None:
            raise StepsmithError("--features is the feature space of --objective; give --objective too (auto, "
                                 "feature-mse, kid, fid, wasserstein)", param="features")
        options["features"] = args.features
    if args.data is not None:
        if args.method != "ays" and not str(args.objective or "").startswith("data-"):
            raise StepsmithError("--data goes with --method ays (the KLUB's data samples) or --objective data-kid, "
                                 "data-fid, data-wasserstein (the real data they compare with); drop it", param="data")
        if args.method == "ays":
            options["data"] = args.data
    if args.source is not None or args.method == "interp":
        if args.method != "interp" or args.source is None:
            raise StepsmithError("--from TABLE goes with --method interp (and interp needs --from)", param="source")
        options["source"] = load_table(args.source)
        args.solver = args.solver or options["source"].solver
    args.solver = args.solver or "euler"
    # before loading the model: the request, then the output path
    for nfe in args.nfe:
        check_request(args.method, nfe, args.solver, samples=args.samples, options=options, exact_nfe=True)
    data_objective = args.data is not None and args.method != "ays"  # --data is the real data of the data objectives
    real = None
    if data_objective:  # a file is read and checked now; a folder of images once the model's size is known (resized to it)
        from schedules.io import check_sample_tensor, load_samples
        from schedules.search import DEFAULT_SAMPLES

        # a distance between distributions needs at least as many real samples as the search compares with them
        need, asked_by = max(2, args.samples or DEFAULT_SAMPLES), "a data objective on the search samples"
        if not (args.data.strip() and Path(args.data).is_dir()):
            real = load_samples(args.data, min_count=need, param="data", asked_by=asked_by)
    if "objective" in options:
        from schedules.search.objectives import feature_name, resolve_objective

        feature_name(resolve_objective(options.get("objective"), args.model, options.get("features")), args.model,
                     options.get("features"), check_data=not data_objective)
    if len(args.nfe) > 1:
        _check_folder(args.out, args.overwrite)
    else:
        check_output_path(args.out, param="out")
    dist = current_dist()  # joins the process group under accelerate launch / torchrun
    model = model_from_args(args)
    if data_objective:  # registered under the adapter's name (the search looks it up by that) and the --model spelling
        from schedules.search.objectives import register_data

        shape = tuple(model.sample_shape)
        real = (load_samples(args.data, shape=shape, min_count=need, param="data", asked_by=asked_by) if real is None
                else check_sample_tensor(real, shape=shape, min_count=need, param="data", source=args.data,
                                         asked_by=asked_by))
        for name in {args.model, model.name}:
            register_data(name, real)
    t0 = time.perf_counter()
    kw = {} if args.method not in SEARCHED else {"samples": args.samples, "seed": args.seed,
                                                   "progress": not args.no_progress}
    if "source" in options and options["source"].model == args.model:
        options["source"].model = model.name  # the CLI records tables under the --model spelling
    tables = make_tables(model, args.method, args.nfe, args.solver, **kw, **options)
    for t in tables.values():
        t.model = args.model
        t.provenance["command"] = args.invocation
    if not dist.main:  # under accelerate launch only the main process writes
        return
    if len(tables) > 1:
        print(json.dumps({"out": args.out, "method": args.method, "tables": _write_folder(args.out, tables),
                          "final_jump": {nfe: t.final_jump() for nfe, t in tables.items()},
                          "seconds": round(time.perf_counter() - t0, 2)}))
        return
    table = next(iter(tables.values()))
    table.save(args.out)
    print(json.dumps({"out": args.out, "method": table.method, "solver": table.solver, "nfe": table.nfe,
                      "steps": table.steps, "timesteps": [round(t, 4) for t in table.timesteps],
                      "objective": table.objective, "final_jump": table.final_jump(),
                      "model_calls": table.provenance.get("model_calls", 0),
                      **({"conditioning": table.conditioning} if table.conditioning else {}),
                      "seconds": round(time.perf_counter() - t0, 2)}))
