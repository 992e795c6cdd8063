"""``stepsmith`` command line: a thin layer over the Python API.

Subcommands are registered through the ``stepsmith.commands`` entry-point group, so the
core package does not import :mod:`eval` or :mod:`distill` (they build on it, never the
reverse). Every user-facing error is one line on stderr and exit code 2; the library names
Python parameters in its errors (``"`samples` must be at least 1"``) and :func:`cli_message`
turns each into the subcommand's flag (``--samples``). ``args.invocation`` is the one record of
the command line: every subcommand that writes a file takes it from there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import shlex
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from schedules.io import StepsmithError

COMMAND_ORDER = ("quickstart", "search", "sample", "eval", "distill", "bench")


def add_model_args(p: argparse.ArgumentParser, conditional: bool = False) -> None:
    """The model options; ``conditional`` adds the conditioning ones (--classes, --guidance, ...)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="builtin:toy2d-flow|digits-flow|digits-ddpm|digits-cond|sharp-ddpm, a diffusers folder, "
                        "or path/to/file.py:attr")
    g.add_argument("--prediction", choices=["flow", "epsilon", "v", "x0"], default=None,
                   help="for file.py:attr models: flow (FlowMatch, t=σ∈[0,1]) or epsilon|v|x0 (VP, discrete t)")
    g.add_argument("--shape", default=None, help="per-sample shape when it cannot be inferred, e.g. 2 or 1,16,16")
    g.add_argument("--scheduler-config", default=None, help="folder with scheduler_config.json (VP betas / FlowMatch)")
    g.add_argument("--weights", default=None, help="safetensors state dict to load into a file.py:attr module")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps; checked before loading")
    if conditional:
        add_conditioning_args(p)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress``, the same flag on every command: no progress bars (a pipeline's loading bars included)."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (also none of diffusers' / transformers' while a pipeline loads)")


def add_conditioning_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conditioning (conditional models)")
    g.add_argument("--classes", default=None,
                   help="class labels of a class-conditional model: all or 0,1,2 (sample i gets label i mod P)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w ≥ 0 (default 1: no guidance)")
    g.add_argument("--null-class", type=int, default=None,
                   help="the unconditional (null) label (default: the model's last class embedding)")
    g.add_argument("--prompts", default=None, help="text file of prompts, one a line (text-to-image models)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="negative prompt of the guidance branch (default: the pipeline's, the empty prompt)")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (text-to-image pipelines; "
                                                            "default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    g.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="T5 prompt tokens of SD3 / Flux pipelines (default: the pipeline's, 256 / 512; Flux schnell "
                        "is run at 256) — the table records it: pass the same max_sequence_length to the pipeline")
    g.add_argument("--true-cfg-scale", type=float, default=None, metavar="W",
                   help="Flux with a guidance embedding (dev): true CFG on top of the embedded --guidance, as the "
                        "pipeline's true_cfg_scale (needs --negative-prompt)")


def _read_prompts(path: str) -> tuple[str, ...]:
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise StepsmithError(f"`prompts` file {path} does not exist; it takes a text file of prompts, one a line, "
                             f"not the prompt itself (e.g. write {path!r} into prompts.txt)", param="prompts")
    prompts = tuple(line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    if not prompts:
        raise StepsmithError(f"`prompts` file {path} holds no prompts (one a line)", param="prompts")
    return prompts


def conditioning_from_args(args: argparse.Namespace):
    """The run's :class:`~schedules.conditioning.Conditioning` from --classes / --prompts / --guidance (None:
    none asked for), checked before the model loads."""
    from schedules.conditioning import Conditioning, parse_classes

    classes, prompts = getattr(args, "classes", None), getattr(args, "prompts", None)
    w = getattr(args, "guidance", None)
    negative, height, width = (getattr(args, k, None) for k in ("negative_prompt", "height", "width"))
    if classes is not None and prompts is not None:
        raise StepsmithError("give --classes (class-conditional) or --prompts (text-to-image), not both")
    if classes is None and prompts is None:
        if w is not None:
            Conditioning(labels="all", guidance=w)  # a negative guidance is refused first
        if negative is not None:
            raise StepsmithError("`negative_prompt` is the guidance branch of --prompts; give --prompts too",
                                 param="negative_prompt")
        if height is not None or width is not None:
            raise StepsmithError("`height` / `width` set the image size of a conditional pipeline; give --prompts "
                                 "or --classes too", param="height" if height is not None else "width")
        return None
    guidance = 1.0 if w is None else w
    if classes is not None:
        if negative is not None:
            raise StepsmithError("`negative_prompt` is for text-to-image models (--prompts), not --classes",
                                 param="negative_prompt")
        return Conditioning(labels=parse_classes(classes), guidance=guidance, height=height, width=width)
    return Conditioning(prompts=_read_prompts(prompts), negative=negative, guidance=guidance, height=height,
                        width=width)


def _guidance_only(model, args: argparse.Namespace):
    """``--guidance`` without --classes / --prompts: a model that came with its own conditioning (a distilled
    student) is guided at that scale; an unconditional one refuses it."""
    w = getattr(args, "guidance", None)
    if w is None:
        return model
    if getattr(model, "conditioning", None) is not None:
        from schedules.conditioning import with_guidance

        return model if model.conditioning.guidance == w else with_guidance(model, w)
    raise StepsmithError(f"{model.name} is an unconditional model; `guidance` applies to conditional models only "
                         "(drop it)", param="guidance")


class _ImageProcessorFallback(logging.Filter):
    """Drops transformers' notice that a pipeline's ``CLIPImageProcessor`` falls back to its PIL twin without
    torchvision. stepsmith never calls that processor (it feeds the safety checker, which stepsmith does not run),
    the fallback is correct, and its advice to install torchvision is wrong beside a CPU torch: the torchvision
    wheels an index resolves for it can break ``import diffusers``. Every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


@contextlib.contextmanager
def _quiet_image_processor_fallback():
    logger = logging.getLogger("transformers.utils.import_utils")
    f = _ImageProcessorFallback()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


@contextlib.contextmanager
def _loading_bars(show: bool):
    """diffusers' and transformers' loading progress bars off while a pipeline loads under ``--no-progress``
    (each library's own switch, restored afterwards)."""
    if show:
        yield
        return
    import importlib.util

    mods = [importlib.import_module(f"{lib}.utils.logging") for lib in ("diffusers", "transformers")
            if importlib.util.find_spec(lib) is not None]  # transformers is optional (text-to-image pipelines)
    was = [(m, m.is_progress_bar_enabled()) for m in mods]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in was:
            if on:
                m.enable_progress_bar()


PIPELINE_OPTIONS = ("max_sequence_length", "true_cfg_scale")  # CLI flags passed to the pipeline adapter as they are


def model_from_args(args: argparse.Namespace):
    from schedules.adapters import load_model

    cond = conditioning_from_args(args)
    options = {k: getattr(args, k) for k in PIPELINE_OPTIONS if getattr(args, k, None) is not None}
    show = not getattr(args, "no_progress", False) and getattr(args, "progress", True)  # distill: dest `progress`
    with _loading_bars(show), _quiet_image_processor_fallback():
        model = load_model(args.model, prediction=args.prediction, shape=args.shape,
                           scheduler_config=args.scheduler_config, weights=args.weights, device=args.device,
                           conditioning=cond, null_class=getattr(args, "null_class", None),
                           pipeline_options=options)
    if cond is None:
        model = _guidance_only(model, args)
    return model


def invocation(argv: list[str]) -> str:
    """The exact command line, recorded in tables and reports so a result can be reproduced."""
    return shlex.join(["stepsmith", *argv])


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Python parameter name → the parser's flag for it (``scheduler_config`` → ``--scheduler-config``)."""
    flags = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest != "help":
            flags[action.dest] = long[0]
    return flags


def cli_message(exc: StepsmithError, parser: argparse.ArgumentParser) -> str:
    """The error's message with each backticked Python parameter that is one of ``parser``'s options
    replaced by its flag; other backticked names (method options of ``--option``) stay as they are."""
    flags = option_flags(parser)
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: flags.get(m.group(1), m.group(0)), str(exc))


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


MEMORY_HINT_FLAGS = ("--num", "--samples", "--batch-size", "--micro-batch")
_ALLOCATION_MARKERS = ("not enough memory", "DefaultCPUAllocator", "out of memory", "can't allocate memory")


def check_device(device: str) -> None:
    """Refuse a ``--device`` this torch build cannot use, before any model is loaded."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise StepsmithError(f"`device` {device!r} is not a torch device; use cpu, cuda, cuda:N or mps",
                             param="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StepsmithError(f"`device` {device}: this torch build has no usable CUDA "
                                 "(torch.cuda.is_available() is False); use --device cpu", param="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StepsmithError(f"`device` {device}: only {torch.cuda.device_count()} CUDA device(s)", param="device")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise StepsmithError(f"`device` {device}: MPS is not available here; use --device cpu", param="device")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise StepsmithError(f"`device` {device}: stepsmith runs on cpu, cuda or mps", param="device")


def is_allocation_failure(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or any(m in str(exc) for m in _ALLOCATION_MARKERS))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def boundary_message(exc: BaseException, sub: argparse.ArgumentParser) -> str | None:
    """The one-line message for an everyday failure (user error, OS error, out of memory), or None for a bug."""
    if isinstance(exc, StepsmithError):
        return " ".join(cli_message(exc, sub).split("\n"))
    if is_allocation_failure(exc):
        flags = [f for f in MEMORY_HINT_FLAGS if f in option_flags(sub).values()]
        hint = f"; lower {' / '.join(flags)}" if flags else "; use a smaller model or input"
        return f"out of memory ({_first_line(exc)}){hint}"
    if isinstance(exc, OSError):
        where = " → ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        return f"{exc.strerror or _first_line(exc)}{': ' + where if where else ''}"
    return None


OUR_PACKAGES = ("schedules", "eval", "distill")  # the distribution's top-level packages, side by side


def _ours(filename: str) -> bool:
    """Whether a warning was issued from this distribution's code (not torch's, diffusers', ...)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rel = Path(filename).resolve().relative_to(root)
    except (ValueError, OSError):
        return False
    return bool(rel.parts) and rel.parts[0] in OUR_PACKAGES


def _warning_printer(command: str):
    """``warnings.showwarning`` for a CLI run: stepsmith's own UserWarnings as one ``stepsmith CMD: warning:``
    line (what the errors look like), every other warning as Python prints it."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and _ours(filename):
            print(f"stepsmith {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.invocation = invocation(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    sub = _subparser(parser, args.command)
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards (main is also called from tests)
            warnings.showwarning = _warning_printer(args.command)
            if getattr(args, "device", None) is not None:
                check_device(args.device)
            args.func(args)
    except KeyboardInterrupt:
        print(f"stepsmith {args.command}: interrupted (outputs are written atomically; nothing half-written)",
              file=sys.stderr)
        return 130
    except Exception as exc:
        message = boundary_message(exc, sub)
        if message is None:
            raise  # a bug: the traceback is what a report needs
        print(f"stepsmith {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


if __name__ == "__main__":
    sys.exit(main())
