"""``stepsmith distill``: straighten a model to a timestep table (BOSS), or the reflow / k-step baselines.

Runs the same as plain ``stepsmith distill ...``, ``python -m distill ...`` and under
``accelerate launch --multi_gpu --num_processes N -m distill ...`` (data parallel; the global
``--batch-size`` is split across processes). Without a GPU the processes use the CPU with
gloo; note that ``accelerate launch --cpu`` starts a *single* process whatever
``--num_processes`` says.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from schedules.cli import add_model_args, model_from_args
from schedules.io import StepsmithError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="straighten a flow to a timestep table (BOSS), or reflow / k-step baselines",
        description="Fine-tune a model so that few-step Euler on --table reproduces its many-step ODE "
                    "(BOSS straightening), or retrain it with the reflow / k-step distillation baselines on the "
                    "same teacher data. Works as plain python and under `accelerate launch -m distill`.")
    add_model_args(p)
    p.add_argument("--table", action="append", required=True, metavar="T.json",
                   help="the table to straighten for (repeat for several budgets; the first is saved as table.json)")
    p.add_argument("--method", choices=["boss", "reflow", "kstep"], default="boss")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (peft); 0 = full fine-tuning (default)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--pairs", type=int, default=2000,
                   help="teacher trajectories from fresh noise (10%% held out for validation); BOSS gets one "
                        "segment pair per table step from each, reflow/k-step one (noise, sample) pair")
    p.add_argument("--out", required=True, help="output folder (written atomically at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work folder")
    p.add_argument("--overwrite", action="store_true", help="replace a finished model folder / old checkpoints")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4, as BOSS)")
    g.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps (default 100)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (default 1)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay cap, 0 = no EMA (default 0.999)")
    g.add_argument("--teacher-steps", type=int, default=100, help="teacher fine-grid steps (default 100)")
    g.add_argument("--teacher-solver", choices=["heun", "euler"], default="heun")
    g.add_argument("--seed", type=int, default=0, help="teacher noise and batch sampling seed")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="for GPUs")
    g.add_argument("--checkpoint-every", type=int, default=500, help="accelerator.save_state every M steps")
    g.add_argument("--work-dir", default=None, help="checkpoints, teacher cache and loss log (default OUT.work)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (checkpointed, not exported) after this many steps; continue later with --resume")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from distill.trainer import DistillConfig, distill
    from schedules.table import load_table

    tables = [load_table(t) for t in args.table]
    model = model_from_args(args)
    for t, path in zip(tables, args.table):
        try:
            t.check_compatible(model.convention, model.prediction, what=args.model)
        except StepsmithError as exc:
            raise StepsmithError(f"{path}: {exc}") from None
    cfg = DistillConfig(
        method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        pairs=args.pairs, teacher_steps=args.teacher_steps, teacher_solver=args.teacher_solver, seed=args.seed,
        mixed_precision=args.mixed_precision, checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
    )
    argv = sys.argv[1:]
    if argv and argv[0] == "distill":
        argv = argv[1:]
    command = "stepsmith distill " + " ".join(shlex.quote(a) for a in argv)
    res = distill(model, tables, cfg, args.out, work_dir=args.work_dir, resume=args.resume, overwrite=args.overwrite,
                  stop_after=args.stop_after, command=command)
    if res is None:
        print(f"stopped after step {args.stop_after}; continue with the same command and --resume")
        return
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        info = res.info
        print(f"{args.method}: {cfg.steps} steps, validation loss {info['final_val_loss']:.5g} "
              f"(trainable {info['trainable_parameters']:,} of {info['parameters']:,} parameters) → {args.out}")
