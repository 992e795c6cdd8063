"""``stepsmith`` command line: a thin layer over the Python API.

Subcommands are registered through the ``stepsmith.commands`` entry-point group, so the
core package does not import :mod:`eval` or :mod:`distill` (they build on it, never the
reverse). Every user-facing error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib.metadata import entry_points

from schedules.io import StepsmithError

COMMAND_ORDER = ("quickstart", "search", "sample", "eval", "distill", "bench")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="builtin:toy2d-flow|digits-flow|digits-ddpm, a diffusers folder, or path/to/file.py:attr")
    g.add_argument("--prediction", choices=["flow", "epsilon", "v", "x0"], default=None,
                   help="for file.py:attr models: flow (FlowMatch, t=σ∈[0,1]) or epsilon|v|x0 (VP, discrete t)")
    g.add_argument("--shape", default=None, help="per-sample shape when it cannot be inferred, e.g. 2 or 1,16,16")
    g.add_argument("--scheduler-config", default=None, help="folder with scheduler_config.json (VP betas / FlowMatch)")
    g.add_argument("--weights", default=None, help="safetensors state dict to load into a file.py:attr module")
    g.add_argument("--device", default="cpu")


def model_from_args(args: argparse.Namespace):
    from schedules.adapters import load_model

    return load_model(args.model, prediction=args.prediction, shape=args.shape,
                      scheduler_config=args.scheduler_config, weights=args.weights, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepsmith",
        description="Few-step sampling for diffusion and flow-matching models: search timestep tables, "
                    "plug them into diffusers pipelines, straighten flows, score FID.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    eps = {ep.name: ep for ep in entry_points(group="stepsmith.commands")}
    for name in sorted(eps, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else 99, n)):
        eps[name].load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # The exact invocation, recorded in reports so a table or a sweep can be reproduced.
    args.invocation = "stepsmith " + " ".join(shlex.quote(a) for a in argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except StepsmithError as exc:
        print(f"stepsmith {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepsmith {args.command}: interrupted (outputs are written atomically; nothing half-written)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
