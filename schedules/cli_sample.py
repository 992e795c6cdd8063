"""``stepsmith sample``: draw samples along a table (or a uniform schedule) and save a picture."""

from __future__ import annotations

import argparse
import json
import time

import torch

from schedules.cli import add_model_args, add_progress_arg, model_from_args
from schedules.io import StepsmithError, check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a model along a timestep table and save a grid / scatter plot",
                       description="Sample a model along a timestep table (or a uniform schedule of --nfe "
                                   "evaluations) and save the samples as a PNG (grid for images, scatter for 2D).")
    add_model_args(p, conditional=True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--table", help="a stepsmith.schedule/v1 JSON table")
    src.add_argument("--nfe", type=int, help="model evaluations for a uniform schedule (default 16)")
    src.add_argument("--reference", action="store_true", help="use the high-accuracy reference sampler (teacher)")
    p.add_argument("--solver", default=None, help="euler|ddim|heun|dpmpp-2m|ipndm|unipc (default: the table's, else euler)")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG file to write (must end in .png; other formats are refused)")
    p.add_argument("--save-tensor", default=None, help="also save the samples as safetensors")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a --table searched for another model (e.g. the same model copied elsewhere)")
    add_progress_arg(p)
    p.set_defaults(func=run)


PNG_SUFFIXES = (".png",)  # sample writes PNG only: other image suffixes are refused, not mislabelled


def check_drawable(shape: tuple[int, ...]) -> None:
    """Refuse, before sampling, samples that :func:`schedules.viz.save_samples` cannot draw."""
    if shape == (2,) or (len(shape) == 3 and shape[0] in (1, 3)):
        return
    raise StepsmithError(f"samples of shape {list(shape)} cannot be drawn as a PNG (a grid needs [1 or 3, H, W] "
                         "images, a scatter plot 2-D points); sample them from Python with schedules.sample")


def check_args(args: argparse.Namespace):
    """Everything checkable before the model loads: counts, output paths, the table or the uniform NFE."""
    from schedules.search import check_request
    from schedules.solvers import get_solver
    from schedules.table import load_table

    if args.num < 1:
        raise StepsmithError("--num must be at least 1")
    check_output_path(args.out, param="out", suffixes=PNG_SUFFIXES)
    if args.save_tensor is not None:
        check_output_path(args.save_tensor, param="save_tensor")
    if args.solver is not None:
        get_solver(args.solver)
    if args.table is not None:  # an empty --table is refused, not read as 'no table'
        from schedules.adapters import check_table_model

        table = load_table(args.table)
        check_table_model(table.model, args.model, allow_other_model=args.allow_other_model)
        return table
    if args.nfe is not None:  # the default 16 stays as it was (Heun: 8 steps, NFE 15)
        get_solver(args.solver or "euler").steps_for_nfe(args.nfe)  # "NFE must be at least 1"
        check_request("uniform", args.nfe, args.solver or "euler", exact_nfe=True)
    return None


@torch.no_grad()
def decode_latents(model, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Final latents of a pipeline model → images in [0, 1], as the pipeline decodes them:
    ``vae.decode(latents / vae.config.scaling_factor + shift_factor)`` (shift 0 when the VAE has none),
    then (x / 2 + 0.5) clamped. An adapter with ``unpack_latents`` (packed latents) is unpacked first."""
    pipe = model.pipeline
    vae = pipe.vae
    unpack = getattr(model, "unpack_latents", None)
    if unpack is not None:
        latents = unpack(latents)
    scale = vae.config.get("scaling_factor", 1.0)
    shift = vae.config.get("shift_factor", None) or 0.0
    dev = next(vae.parameters()).device
    out = []
    for b in range(0, latents.shape[0], batch_size):
        z = latents[b:b + batch_size].to(device=dev, dtype=vae.dtype) / scale + shift
        out.append(vae.decode(z).sample.float().cpu())
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def class_rows(x: torch.Tensor, classes: int) -> tuple[torch.Tensor, int]:
    """Samples rearranged so that row c of a grid holds the samples of condition c (i mod P = c);
    short rows are padded with blank (white) images. Returns (images, images per row)."""
    cols = -(-x.shape[0] // classes)
    out = torch.ones((classes * cols, *x.shape[1:]), dtype=x.dtype)
    for c in range(classes):
        row = x[c::classes]
        out[c * cols: c * cols + len(row)] = row
    return out, cols


def save_class_grid(x: torch.Tensor, path: str, classes: int) -> None:
    from schedules.io import atomic_path
    from schedules.viz import image_grid

    images, cols = class_rows(x.detach().float().cpu(), classes)
    with atomic_path(path) as tmp:
        image_grid(images, nrow=cols).save(tmp, format="PNG")


def run(args: argparse.Namespace) -> None:
    from schedules.baselines import uniform
    from schedules.solvers import get_solver, reference_sample, sample_table
    from schedules.viz import save_samples

    table = check_args(args)
    model = model_from_args(args)
    pipeline = getattr(model, "pipeline", None)  # pipeline models: latents, decoded by the pipeline's VAE
    if pipeline is None:
        check_drawable(model.sample_shape)
    noise = model.noise(args.num, args.seed)
    t0 = time.perf_counter()
    if args.reference:
        x = reference_sample(model, noise, progress=not args.no_progress)
        label = "reference"
    else:
        if table is not None:
            table.check_compatible(model.convention, model.prediction, what=args.model)
            table.check_conditioning(getattr(model, "conditioning", None))  # one `warning:` line via the CLI
            solver = args.solver or table.solver
        else:
            solver = args.solver or "euler"
            table = uniform(model, 16 if args.nfe is None else args.nfe, solver)
        x = sample_table(model, noise, table, solver, progress=not args.no_progress)  # olss tables replay their coefficients
        label = f"{table.method} {solver} NFE {get_solver(solver).nfe(table.steps)}"
    seconds = time.perf_counter() - t0
    ref = None
    if model.sample_shape == (2,) and model.name == "builtin:toy2d-flow":
        from schedules.embedded.nets import toy2d_data

        ref = toy2d_data(2000, seed=12345)
    cond = getattr(model, "conditioning", None)
    latents = x
    if pipeline is not None:
        x = decode_latents(model, latents) * 2 - 1  # image_grid reads [-1, 1]
    if cond is not None and x.ndim == 4 and (cond.kind == "class" or pipeline is not None):
        save_class_grid(x, args.out, cond.size)  # rows = conditions (classes or prompts)
    else:
        save_samples(x, args.out, title=f"{model.name}: {label}", reference=ref)
    if args.save_tensor:
        from schedules.io import save_safetensors

        save_safetensors(args.save_tensor, {"samples": latents.detach().cpu().to(torch.float32)})
    print(json.dumps({"out": args.out, "model": model.name, "schedule": label, "num": args.num,
                      "seed": args.seed, "model_calls": model.calls, "seconds": round(seconds, 2),
                      **({"conditioning": cond.describe()} if cond is not None else {})}))
