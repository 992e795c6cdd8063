"""The distillation trainer: BOSS straightening, reflow and k-step distillation on accelerate.

The same function runs as plain ``python`` / ``stepsmith distill`` and under
``accelerate launch`` (data-parallel, any number of processes or nodes):

* the teacher trajectories are generated once (main process) and cached in the work
  folder; the other processes wait and read them;
* every step draws the *global* batch from a generator seeded by (seed, step) and each
  process trains on its slice, so N processes reproduce 1 process at the same global
  batch (up to floating-point reduction order) and a resumed run draws the same batches;
* ``accelerator.save_state`` every ``checkpoint_every`` steps into ``<work>/ckpt-<step>``
  (written to a temporary folder, then renamed), plus the EMA weights (safetensors) and a
  ``meta.json``. ``resume=True`` continues from the newest checkpoint and refuses changed
  hyper-parameters;
* the result is written atomically to ``out`` (see :mod:`distill.export`).

EMA: :class:`EMA`, the update of diffusers' ``EMAModel(use_ema_warmup=True, power=2/3)``
(decay 1 - (1 + step)^-2/3, capped at ``ema_decay``) over the trainable parameters (the
LoRA factors when LoRA is on), written out here because importing ``diffusers.training_utils``
costs seconds to tens of seconds on a small CPU. Short runs are not dominated by the
initial weights; the output holds the EMA weights. Checkpointed as safetensors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.base import Batch, DistillMethod, straightening_loss
from distill.boss import BOSSStraightening
from distill.data import TeacherData, generate_teacher_data, table_nodes
from distill.kstep import KStepDistillation
from distill.reflow import Reflow
from schedules.adapters import ModelAdapter
from schedules.io import StepsmithError, atomic_write, atomic_write_json, load_safetensors, save_safetensors
from schedules.table import TimestepTable

METHODS = ("boss", "reflow", "kstep")
MIXED_PRECISION = ("no", "fp16", "bf16")
# settings that may change when resuming (everything else must match the checkpoint)
RUN_SETTINGS = ("checkpoint_every", "log_every", "keep_checkpoints", "progress", "eval_every")


@dataclass
class DistillConfig:
    """Hyper-parameters of one distillation run (defaults follow BOSS where it says)."""

    method: str = "boss"
    steps: int = 2000                # optimizer steps
    batch_size: int = 256            # global batch (split across processes)
    lr: float = 2e-4                 # BOSS: Adam 2e-4
    warmup: int = 100                # linear LR warm-up steps (BOSS: 5k of 12k)
    grad_clip: float = 1.0           # BOSS: clip 1
    weight_decay: float = 0.0
    ema_decay: float = 0.999         # 0 disables EMA
    lora_rank: int = 0               # 0 = full fine-tuning
    lora_alpha: float | None = None  # default: = rank
    pairs: int = 2000                # teacher trajectories (BOSS: P·K segment pairs; reflow: P pairs)
    teacher_steps: int = 100         # fine grid of the teacher (reference_sigmas) merged with the table nodes
    teacher_solver: str = "heun"
    val_fraction: float = 0.1
    seed: int = 0
    mixed_precision: str = "no"
    # run settings (free to change on resume)
    checkpoint_every: int = 500
    eval_every: int = 250
    log_every: int = 25
    keep_checkpoints: int = 2
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise StepsmithError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise StepsmithError(f"--mixed-precision {self.mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
        for name in ("steps", "batch_size", "pairs", "teacher_steps", "checkpoint_every", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise StepsmithError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise StepsmithError(f"--lora-rank must be ≥ 0 (0 = full fine-tuning), got {self.lora_rank}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise StepsmithError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise StepsmithError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 < self.val_fraction < 0.5:
            raise StepsmithError(f"val_fraction must lie in (0, 0.5), got {self.val_fraction}")

    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in RUN_SETTINGS}


@dataclass
class DistillResult:
    module: torch.nn.Module          # the distilled network (EMA weights, LoRA merged), on CPU
    adapter: ModelAdapter            # the teacher's adapter with the distilled module
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


def build_method(name: str, data: TeacherData, tables: Sequence[TimestepTable], adapter: ModelAdapter) -> DistillMethod:
    conv = adapter.convention
    if name == "boss":
        return BOSSStraightening(data, tables, conv)
    if name == "reflow":
        return Reflow(data, conv)
    if name == "kstep":
        from schedules.baselines import uniform

        grid: list[float] = []
        for t in tables:
            if conv.name == "flow":
                grid += torch.linspace(data.nodes[0], 0.0, t.steps + 1, dtype=torch.float64).tolist()
            else:
                grid += uniform(adapter, t.steps, "euler").sigmas
        return KStepDistillation(data, grid, conv)
    raise StepsmithError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------ LoRA


def lora_targets(module: torch.nn.Module) -> list[str]:
    """Names of the Linear and Conv2d layers (LoRA goes on all of them)."""
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n]


def add_lora(module: torch.nn.Module, rank: int, alpha: float | None) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise StepsmithError("--lora-rank needs peft: pip install 'stepsmith[lora]' (or pip install peft)") from None
    targets = lora_targets(module)
    if not targets:
        raise StepsmithError("--lora-rank: the model has no Linear/Conv2d layer to adapt; use full fine-tuning")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    return get_peft_model(module, cfg)


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    if hasattr(module, "merge_and_unload"):
        return module.merge_and_unload()
    return module


# ------------------------------------------------------------------------------------ helpers


class EMA:
    """Exponential moving average with warm-up, as diffusers ``EMAModel(use_ema_warmup=True)``:
    at optimization step k the decay is min(cap, 1 - (1 + k - 1)^-power) (0 at the first step)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, power: float = 2 / 3):
        self.decay, self.power = decay, power
        self.shadow_params = [p.detach().clone() for p in params]
        self.optimization_step = 0

    def current_decay(self) -> float:
        step = self.optimization_step - 1
        if step <= 0:
            return 0.0
        return min(self.decay, 1 - (1 + step) ** -self.power)

    @torch.no_grad()
    def step(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.optimization_step += 1
        d = self.current_decay()
        for s, p in zip(self.shadow_params, params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow_params, params):
            p.copy_(s)


def _checkpoints(work: Path) -> list[tuple[int, Path]]:
    out = []
    for p in work.glob("ckpt-*"):
        if p.is_dir() and p.name[5:].isdigit():
            out.append((int(p.name[5:]), p))
    return sorted(out)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 12_345) % (2**63 - 1))


def run_record(config: DistillConfig, adapter: ModelAdapter, tables: Sequence[TimestepTable]) -> dict[str, Any]:
    """What must match between a checkpoint and a resumed run."""
    return {"hyperparameters": config.hyperparameters(), "model": adapter.name,
            "tables": [t.sigmas for t in tables]}


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} vs now {b!r}")
    return out


def default_work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".work")


# ------------------------------------------------------------------------------------ main entry


def distill(adapter: ModelAdapter, tables: TimestepTable | Sequence[TimestepTable], config: DistillConfig,
            out: str | Path | None = None, *, work_dir: str | Path | None = None, resume: bool = False,
            overwrite: bool = False, accelerator=None, stop_after: int | None = None,
            command: str | None = None, teacher_data: TeacherData | None = None) -> DistillResult | None:
    """Distill ``adapter``'s model so that few-step Euler on ``tables`` matches its many-step ODE.

    ``out``: output folder (written atomically at the end; refused if it holds a finished
    model unless ``overwrite``); ``None`` returns the module without writing (a work folder
    is then required only for checkpoints: pass ``work_dir``). ``stop_after`` ends the run
    after that many optimizer steps *without* exporting (a time slice, or a simulated kill);
    it returns ``None``. ``teacher_data`` reuses trajectories already generated (benchmarks
    compare methods on identical teacher data).
    """
    from accelerate import Accelerator

    from distill.export import check_output_free, export_model

    config.validate()
    tables = [tables] if isinstance(tables, TimestepTable) else list(tables)
    if not tables:
        raise StepsmithError("give at least one timestep table (--table T.json)")
    for t in tables:
        t.check_compatible(adapter.convention, adapter.prediction, what=adapter.name)
    table_nodes(tables)
    out = Path(out) if out is not None else None
    if out is not None:
        check_output_free(out, overwrite)
    work = Path(work_dir) if work_dir is not None else (default_work_dir(out) if out is not None else None)

    if accelerator is None:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    if config.batch_size % world:
        raise StepsmithError(f"--batch-size {config.batch_size} is not divisible by the {world} processes")
    main = accelerator.is_main_process
    record = run_record(config, adapter, tables)

    # ---------------------------------------------------------------- work folder / resume
    start_ckpt: Path | None = None
    if work is not None:
        if main:
            work.mkdir(parents=True, exist_ok=True)
            rec_file = work / "run.json"
            ckpts = _checkpoints(work)
            if resume and rec_file.is_file():
                try:
                    old = json.loads(rec_file.read_text())
                except json.JSONDecodeError:
                    raise StepsmithError(f"{rec_file} is corrupt; delete {work} and start without --resume") from None
                changed = _diff(old, record)
                if changed:
                    raise StepsmithError(
                        "cannot resume: the hyper-parameters changed since the checkpoint (" + "; ".join(changed)
                        + f"). Rerun with the original settings, or delete {work} (or drop --resume) to start over"
                    )
            elif ckpts and not resume:
                if overwrite:
                    for _, p in ckpts:
                        shutil.rmtree(p)
                else:
                    raise StepsmithError(
                        f"{work} holds checkpoints of an earlier run (step {ckpts[-1][0]}); pass --resume to continue "
                        "it, or --overwrite to start over"
                    )
            atomic_write_json(rec_file, record)
        accelerator.wait_for_everyone()
        if resume:
            ckpts = _checkpoints(work)
            if ckpts:
                start_ckpt = ckpts[-1][1]
            elif main:
                print(f"stepsmith distill: no checkpoint in {work}; starting from step 0")

    # ---------------------------------------------------------------- teacher data
    t0 = time.perf_counter()
    if teacher_data is None:
        teacher_data = _teacher_data(adapter, tables, config, work, accelerator)
    data = teacher_data
    method = build_method(config.method, data, tables, adapter)
    seconds_teacher = time.perf_counter() - t0

    # ---------------------------------------------------------------- student, optimizer, EMA
    torch.manual_seed(config.seed)
    module = copy.deepcopy(adapter.module).float()
    n_total = sum(p.numel() for p in module.parameters())
    if config.lora_rank > 0:
        module = add_lora(module, config.lora_rank, config.lora_alpha)
    else:
        module.requires_grad_(True)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # the LR schedule is a pure function of the step (linear warm-up, then constant), set by
    # hand each step: nothing to checkpoint, and no prepared scheduler that accelerate would
    # step once per process
    model, opt = accelerator.prepare(module, opt)
    ema = EMA(params, config.ema_decay) if config.ema_decay > 0 else None
    student = dataclasses.replace(adapter, module=model, calls=0)

    start = 0
    history: list[dict[str, float]] = []
    if start_ckpt is not None:
        start, history = _load_checkpoint(start_ckpt, accelerator, ema, params)
        if main:
            print(f"stepsmith distill: resumed from {start_ckpt} (step {start})")

    # ---------------------------------------------------------------- loop
    val_batch = method.validation()
    if start == 0:
        history.append({"step": 0, "val_loss": _val_loss(student, val_batch, accelerator)})
    rank, local = accelerator.process_index, config.batch_size // world
    logf = _LossLog(work, main, resume and start > 0) if work is not None else None
    if logf is not None and start == 0:
        logf.write({"step": 0, "loss": float("nan"), "val_loss": history[0]["val_loss"], "lr": 0.0, "seconds": 0.0})
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc=f"distill {config.method}",
               disable=not (config.progress and main), dynamic_ncols=True)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    t1 = time.perf_counter()
    running: list[float] = []
    for step in range(start, end):
        batch = method.draw(_step_generator(config.seed, step), config.batch_size)
        batch = batch.slice(slice(rank * local, (rank + 1) * local)).to(accelerator.device)
        lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
        for group in opt.param_groups:
            group["lr"] = lr
        with accelerator.autocast():
            loss = straightening_loss(student, batch)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        running.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            rec = {"step": done, "loss": sum(running) / len(running), "lr": lr,
                   "seconds": round(time.perf_counter() - t1, 2)}
            running = []
            if done % config.eval_every == 0 or done == config.steps:
                rec["val_loss"] = _val_loss(student, val_batch, accelerator)
            history.append(rec)
            if logf is not None:
                logf.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", **({"val": f"{rec['val_loss']:.4g}"} if "val_loss" in rec else {}))
        bar.update(1)
        if work is not None and done % config.checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(work, done, accelerator, ema, params, history, config.keep_checkpoints)
    bar.close()
    if logf is not None:
        logf.close()
    if end < config.steps:
        if work is not None and end > start and end % config.checkpoint_every != 0:
            _save_checkpoint(work, end, accelerator, ema, params, history, config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return None

    # ---------------------------------------------------------------- finish
    val_raw = _val_loss(student, val_batch, accelerator)
    if ema is not None:
        ema.copy_to(params)
    val_ema = _val_loss(student, val_batch, accelerator)
    final = merge_lora(accelerator.unwrap_model(model)).eval()
    final.requires_grad_(False)
    final = final.to("cpu")
    info = {
        "method": method.describe(), "config": asdict(config), "model": adapter.name,
        "convention": adapter.describe(), "tables": [t.to_dict() for t in tables],
        "parameters": n_total, "trainable_parameters": n_trainable, "processes": world,
        "teacher_calls": data.teacher_calls, "teacher_seconds": round(seconds_teacher, 2),
        "train_seconds": round(time.perf_counter() - t1, 2), "final_val_loss_raw": val_raw,
        "final_val_loss": val_ema, "teacher_data": data.fingerprint, "command": command,
    }
    result = DistillResult(module=final, adapter=dataclasses.replace(adapter, module=final, calls=0),
                           history=history, info=info, out=out)
    if out is not None:
        if main:
            export_model(adapter, final, tables, out, info, history, overwrite=overwrite,
                         loss_log=(work / "loss.log") if work is not None else None)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        accelerator.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------ pieces


def _teacher_data(adapter: ModelAdapter, tables, config: DistillConfig, work: Path | None, accelerator) -> TeacherData:
    from distill.data import data_fingerprint

    fp = data_fingerprint(adapter, table_nodes(tables), config.pairs, config.seed, config.teacher_steps,
                          config.teacher_solver, config.val_fraction)
    path = work / "teacher.safetensors" if work is not None else None

    def make() -> TeacherData:
        return generate_teacher_data(adapter, tables, config.pairs, seed=config.seed,
                                     teacher_steps=config.teacher_steps, teacher_solver=config.teacher_solver,
                                     val_fraction=config.val_fraction, progress=config.progress)

    if path is None:
        return make()
    if accelerator.is_main_process:
        cached = None
        if path.is_file():
            try:
                cached = TeacherData.load(path)
            except StepsmithError:
                cached = None
        if cached is None or cached.fingerprint != fp:
            data = make()
            data.save(path)
    accelerator.wait_for_everyone()
    return TeacherData.load(path)


@torch.no_grad()
def _val_loss(student: ModelAdapter, batch: Batch, accelerator, chunk: int = 1024) -> float:
    model = student.module
    was = model.training
    model.eval()
    plain = dataclasses.replace(student, module=accelerator.unwrap_model(model))
    total, n = 0.0, 0
    for i in range(0, len(batch), chunk):
        b = batch.slice(slice(i, i + chunk)).to(accelerator.device)
        total += float(straightening_loss(plain, b)) * len(b)
        n += len(b)
    model.train(was)
    return total / max(1, n)


class _LossLog:
    """Plain-text loss log (tab separated), plus TensorBoard when it is installed."""

    def __init__(self, work: Path, main: bool, append: bool):
        self.main, self.path, self.tb = main, work / "loss.log", None
        if not main:
            return
        if not append or not self.path.exists():
            self.path.write_text("step\tloss\tval_loss\tlr\tseconds\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(work / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, rec: dict) -> None:
        if not self.main:
            return
        val = rec.get("val_loss")
        with open(self.path, "a") as fh:
            fh.write(f"{rec['step']}\t{rec['loss']:.6g}\t{'' if val is None else f'{val:.6g}'}\t{rec['lr']:.3g}\t{rec['seconds']}\n")
        if self.tb is not None:
            self.tb.add_scalar("loss/train", rec["loss"], rec["step"])
            if val is not None:
                self.tb.add_scalar("loss/val", val, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _save_checkpoint(work: Path, step: int, accelerator, ema, params, history, keep: int) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed to ``ckpt-<step>`` when complete."""
    tmp = work / f".ckpt-{step:08d}.tmp"
    final = work / f"ckpt-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        if ema is not None:
            save_safetensors(tmp / "ema.safetensors", {f"p{i}": t for i, t in enumerate(ema.shadow_params)},
                             metadata={"optimization_step": str(ema.optimization_step)})
        atomic_write_json(tmp / "meta.json", {"step": step, "history": history})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in _checkpoints(work)[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, accelerator, ema, params) -> tuple[int, list]:
    try:
        meta = json.loads((path / "meta.json").read_text())
        step, history = int(meta["step"]), list(meta["history"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StepsmithError(f"checkpoint {path} is corrupt or incomplete ({type(exc).__name__}: {exc}); "
                             "delete it to resume from an older one, or start without --resume") from None
    try:
        accelerator.load_state(str(path))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StepsmithError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first[:200]}); it is corrupt "
                             "or from another model — delete it to resume from an older one, or start without --resume") from None
    if ema is not None:
        shadow = load_safetensors(path / "ema.safetensors")
        from safetensors import safe_open

        with safe_open(str(path / "ema.safetensors"), framework="pt") as fh:
            ema_step = int((fh.metadata() or {}).get("optimization_step", step))
        if len(shadow) != len(ema.shadow_params):
            raise StepsmithError(f"checkpoint {path}: EMA holds {len(shadow)} tensors, the model {len(ema.shadow_params)}; "
                                 "the checkpoint is from another model or LoRA setting")
        for i, t in enumerate(ema.shadow_params):
            t.copy_(shadow[f"p{i}"].to(t.device, t.dtype))
        ema.optimization_step = ema_step
    return step, history


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, text)
