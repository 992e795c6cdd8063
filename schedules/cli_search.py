"""``stepsmith search``: build a timestep table for a model, a solver and an NFE budget."""

from __future__ import annotations

import argparse
import json
import time

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


def register(sub: argparse._SubParsersAction) -> None:
    from schedules.cli import add_model_args

    p = sub.add_parser("search", help="search (or generate) a timestep table",
                       description="Search a timestep table for a model, solver and NFE budget, or generate a "
                                   "baseline schedule. The table is written atomically as stepsmith.schedule/v1 JSON.")
    add_model_args(p)
    p.add_argument("--method", default="dp",
                   help="dp (default), evolution, ays, or a baseline: uniform, quadratic, karras, exponential, logsnr, "
                        "shift, linspace, leading, trailing, default, ays-gaussian, ays-published")
    p.add_argument("--nfe", type=int, required=True, help="model evaluations (Heun: 2K-1 for K steps, so odd)")
    p.add_argument("--solver", default="euler", help="euler | ddim | heun | dpmpp-2m")
    p.add_argument("--samples", type=int, default=None, help="search samples B (default 64)")
    p.add_argument("--grid", type=int, default=None, help="grid intervals for dp/evolution (default 100; heun 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the search samples (evaluate on others)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (dp: mode=refined|teacher|student, late_weight=1.15; "
                        "karras: rho=7; shift: shift=3; evolution: generations=10, checkpoint=PATH; ays: ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="JSON table to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from schedules.cli import model_from_args
    from schedules.distributed import current_dist
    from schedules.search import SEARCHED, check_request, make_table

    options = dict(_parse_option(o) for o in args.option)
    if args.grid is not None:
        options["grid"] = args.grid
    # before loading the model: the request, then the output path
    check_request(args.method, args.nfe, args.solver, samples=args.samples, options=options, exact_nfe=True)
    check_output_path(args.out, param="out")
    dist = current_dist()  # joins the process group under accelerate launch / torchrun
    model = model_from_args(args)
    t0 = time.perf_counter()
    kw = {} if args.method not in SEARCHED else {"samples": args.samples, "seed": args.seed,
                                                   "progress": not args.no_progress}
    table = make_table(model, args.method, args.nfe, args.solver, **kw, **options)
    table.model = args.model
    table.provenance["command"] = args.invocation
    if not dist.main:  # under accelerate launch only the main process writes
        return
    table.save(args.out)
    print(json.dumps({"out": args.out, "method": table.method, "solver": table.solver, "nfe": table.nfe,
                      "steps": table.steps, "timesteps": [round(t, 4) for t in table.timesteps],
                      "objective": table.objective, "model_calls": table.provenance.get("model_calls", 0),
                      "seconds": round(time.perf_counter() - t0, 2)}))
