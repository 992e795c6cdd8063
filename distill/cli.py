"""``stepsmith distill``: straighten a model to a timestep table (BOSS), or the reflow / k-step baselines.

Conditional models take the conditioning flags of ``stepsmith search`` (``--classes all --guidance 3``
for a class-conditional model, ``--prompts FILE --guidance 7.5`` for a text-to-image pipeline): the
teacher trajectories and the student are both guided at that scale, and the output folder loads
(``--model DIR``) under that conditioning; its ``table.json`` records it.

Runs the same as plain ``stepsmith distill ...``, ``python -m distill ...`` and under
``accelerate launch --multi_gpu --num_processes N -m distill ...`` (data parallel; the global
``--batch-size`` is split across processes). Without a GPU the processes use the CPU with
gloo; note that ``accelerate launch --cpu`` starts a *single* process whatever
``--num_processes`` says.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from distill.config import DistillConfig
from schedules.cli import add_model_args, model_from_args
from schedules.io import StepsmithError, check_output_path

# DistillConfig fields listed with --table/--out (the others under "training"); --steps has a
# library default but the command line asks for the budget explicitly
MAIN_FIELDS = ("method", "steps", "lora_rank", "lora_alpha", "pairs")
REQUIRED_FIELDS = ("steps",)


def flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def field_argument(f: dataclasses.Field, hint: Any) -> tuple[str, dict[str, Any]]:
    """The flag and ``add_argument`` keywords of one config field: its type (``X | None`` → X), default,
    ``metadata["help"]`` and ``metadata["choices"]``; a bool that defaults to True becomes ``--no-<name>``."""
    help_text = f.metadata.get("help")
    if hint is bool:
        if f.default:
            return "--no-" + f.name.replace("_", "-"), {"dest": f.name, "action": "store_false",
                                                         "help": help_text and f"no {help_text}"}
        return flag(f.name), {"dest": f.name, "action": "store_true", "help": help_text}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kw: dict[str, Any] = {"dest": f.name, "type": args[0] if isinstance(hint, types.UnionType) else hint,
                          "default": f.default, "help": help_text}
    if "choices" in f.metadata:
        kw["choices"] = list(f.metadata["choices"])
    if f.name in REQUIRED_FIELDS:
        kw.update(required=True, default=None)
    return flag(f.name), kw


def add_config_args(main: argparse._ActionsContainer, training: argparse._ActionsContainer,
                    names: tuple[str, ...]) -> None:
    """The flags of the :class:`DistillConfig` fields in ``names`` (``MAIN_FIELDS`` go to ``main``)."""
    hints = typing.get_type_hints(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        if f.name in names:
            name, kw = field_argument(f, hints[f.name])
            (main if f.name in MAIN_FIELDS else training).add_argument(name, **kw)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="straighten a flow to a timestep table (BOSS), or reflow / k-step baselines",
        description="Fine-tune a model so that few-step Euler on --table reproduces its many-step ODE "
                    "(BOSS straightening), or retrain it with the reflow / k-step distillation baselines on the "
                    "same teacher data. Works as plain python and under `accelerate launch -m distill`.")
    add_model_args(p, conditional=True)  # --classes / --prompts / --guidance: conditional models distill guided
    p.add_argument("--table", action="append", required=True, metavar="T.json",
                   help="the table to straighten for (repeat for several budgets; the first is saved as table.json)")
    g = p.add_argument_group("training")
    add_config_args(p, g, MAIN_FIELDS)
    p.add_argument("--out", required=True, help="output folder (written atomically at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work folder")
    p.add_argument("--overwrite", action="store_true", help="replace a finished model folder / old checkpoints")
    p.add_argument("--allow-other-model", action="store_true",
                   help="straighten along a table searched for another model (e.g. the same model copied elsewhere)")
    add_config_args(p, g, tuple(f.name for f in dataclasses.fields(DistillConfig) if f.name not in MAIN_FIELDS))
    g.add_argument("--work-dir", default=None, help="checkpoints, teacher cache and loss log (default OUT.work)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (checkpointed, not exported) after this many steps; continue later with --resume")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from distill.trainer import distill
    from schedules.table import load_table

    tables = [load_table(t) for t in args.table]
    check_output_path(args.out, param="out", folder=True)  # before the model loads
    if args.work_dir is not None:
        check_output_path(args.work_dir, param="work_dir", folder=True)
    from schedules.adapters import check_table_model

    for t, path in zip(tables, args.table):  # the table's model, before the model loads
        try:
            check_table_model(t.model, args.model, allow_other_model=args.allow_other_model)
        except StepsmithError as exc:
            raise StepsmithError(f"{path}: {exc}", param=exc.param) from None
    model = model_from_args(args)  # a conditional model: the teacher and the student are guided at --guidance
    for t, path in zip(tables, args.table):
        try:
            t.check_compatible(model.convention, model.prediction, what=args.model)
        except StepsmithError as exc:
            raise StepsmithError(f"{path}: {exc}") from None
    cfg = config_from_args(args)
    res = distill(model, tables, cfg, args.out, work_dir=args.work_dir, resume=args.resume, overwrite=args.overwrite,
                  stop_after=args.stop_after, command=args.invocation)
    if res is None:
        print(f"stopped after step {args.stop_after}; continue with the same command and --resume")
        return
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        info = res.info
        print(f"{args.method}: {cfg.steps} steps, validation loss {info['final_val_loss']:.5g} "
              f"(trainable {info['trainable_parameters']:,} of {info['parameters']:,} parameters) → {args.out}")
