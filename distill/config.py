"""The hyper-parameters of one distillation run, stated once.

:class:`DistillConfig` is what :func:`distill.trainer.distill` takes, and the source of the
``stepsmith distill`` training flags (:mod:`distill.cli` generates one flag per field, named
``--field-name``, with the field's type, default and ``metadata["help"]``; ``%(default)s`` in a
help text is argparse's placeholder for the default, so no default is written twice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from schedules.couplings import COUPLINGS, Coupling
from schedules.io import StepsmithError

METHODS = ("boss", "reflow", "kstep")
TEACHER_SOLVERS = ("heun", "euler")  # the solvers a distillation teacher may use (checked in distill.data)
MIXED_PRECISION = ("no", "fp16", "bf16")
# settings that may change when resuming (everything else must match the checkpoint)
RUN_SETTINGS = ("checkpoint_every", "log_every", "keep_checkpoints", "progress", "eval_every")


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field whose metadata carries its command-line help (and ``choices``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class DistillConfig:
    """Hyper-parameters of one distillation run (defaults follow BOSS where it says)."""

    method: str = option("boss", "distillation objective", choices=METHODS)
    steps: int = option(2000, "optimizer steps")
    batch_size: int = option(256, "global batch size (default %(default)s)")  # split across processes
    lr: float = option(2e-4, "AdamW learning rate (default %(default)s, as BOSS)")
    warmup: int = option(100, "linear LR warm-up steps (default %(default)s)")  # BOSS: 5k of 12k
    grad_clip: float = option(1.0, "gradient-norm clip, 0 = off (default %(default)s)")  # BOSS: clip 1
    weight_decay: float = option(0.0, "AdamW weight decay (default %(default)s)")
    ema_decay: float = option(0.999, "EMA decay cap, 0 = no EMA (default %(default)s)")
    lora_rank: int = option(0, "LoRA rank (peft); 0 = full fine-tuning (default)")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank)")
    pairs: int = option(2000, "teacher trajectories from fresh noise (--val-fraction of them held out for "
                              "validation); BOSS gets one segment pair per table step from each, reflow/k-step "
                              "one (noise, sample) pair (default %(default)s)")
    teacher_steps: int = option(100, "teacher fine-grid steps (default %(default)s)")  # merged with the table nodes
    teacher_solver: str = option("heun", "solver of the teacher trajectories", choices=TEACHER_SOLVERS)
    val_fraction: float = option(0.1, "fraction of the teacher trajectories held out for validation "
                                      "(default %(default)s)")
    coupling: str = option("independent", "noise–sample coupling of the reflow / k-step pairs: the teacher's own "
                                          "pairs, minibatch exact OT, or condition-aware OT (C²OT)", choices=COUPLINGS)
    ot_batch: int | None = option(None, "pairs per OT problem of --coupling ot|c2ot, separate from the network batch "
                                        "(default: the network batch)")
    seed: int = option(0, "teacher noise and batch sampling seed")
    mixed_precision: str = option("no", "for GPUs", choices=MIXED_PRECISION)
    # run settings (free to change on resume)
    checkpoint_every: int = option(500, "accelerator.save_state every M steps")
    eval_every: int = option(250, "validation loss every N steps (default %(default)s)")
    log_every: int = option(25, "training loss logged every N steps (default %(default)s)")
    keep_checkpoints: int = option(2, "checkpoints kept in the work folder (default %(default)s)")
    progress: bool = option(True, "progress bar")

    def validate(self, conditional: bool = False) -> None:
        """Refuse settings no run can use; errors name the field in backticks (the CLI shows its flag).
        ``conditional``: the model is conditional (its teacher data carries condition indices)."""
        for name, allowed in (("method", METHODS), ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, name) not in allowed:
                raise StepsmithError(f"`{name}` {getattr(self, name)!r}: use one of {', '.join(allowed)}", param=name)
        for name in ("steps", "batch_size", "pairs", "teacher_steps", "checkpoint_every", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise StepsmithError(f"`{name}` must be at least 1, got {getattr(self, name)}", param=name)
        if self.lora_rank < 0:
            raise StepsmithError(f"`lora_rank` must be ≥ 0 (0 = full fine-tuning), got {self.lora_rank}",
                                 param="lora_rank")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise StepsmithError(f"`lr` must be a positive number, got {self.lr}", param="lr")
        if not 0 <= self.ema_decay < 1:
            raise StepsmithError(f"`ema_decay` must lie in [0, 1), got {self.ema_decay}", param="ema_decay")
        if not 0 < self.val_fraction < 0.5:
            raise StepsmithError(f"`val_fraction` must lie in (0, 0.5), got {self.val_fraction}", param="val_fraction")
        self.check_coupling(conditional)

    def check_coupling(self, conditional: bool = False) -> None:
        """The coupling exists, has a positive OT batch, belongs to a method that draws (noise, sample) pairs,
        and (C²OT) has conditions to respect: those of a ``conditional`` model's teacher data."""
        if self.coupling != "independent" and self.method == "boss":
            raise StepsmithError(f"`coupling` {self.coupling!r} applies to reflow and kstep; BOSS regresses the "
                                 "teacher's own trajectories", param="coupling")
        n_val = max(1, int(round(self.pairs * self.val_fraction)))
        # before any teacher call; the teacher data of a conditional model carries its condition indices
        Coupling(self.coupling, self.ot_batch).check(self.pairs - n_val, conditional=conditional)

    def hyperparameters(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_SETTINGS}
