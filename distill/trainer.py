"""The distillation trainer: BOSS straightening, reflow and k-step distillation on accelerate.

The same function runs as plain ``python`` / ``stepsmith distill`` and under
``accelerate launch`` (data-parallel, any number of processes or nodes). :func:`distill` is
four steps:

1. the work folder (:mod:`distill.workdir`): ``run.json``, the teacher trajectories generated
   once by the main process and read by the others, and the checkpoint to resume from;
   ``resume=True`` refuses changed hyper-parameters;
2. the student (:mod:`distill.student`): a copy of the teacher's network, LoRA, AdamW, EMA;
3. the loop (:class:`Training`): every step draws the *global* batch from a generator seeded
   by (seed, step) and each process trains on its slice, so N processes reproduce 1 process
   at the same global batch (up to floating-point reduction order) and a resumed run draws the
   same batches; a checkpoint (:mod:`distill.checkpoint`) every ``checkpoint_every`` steps;
4. the export: the EMA weights, LoRA merged, written atomically to ``out``
   (:mod:`distill.export`); a pipeline model trained with LoRA also gets its LoRA weights in the
   format of the pipeline's ``load_lora_weights``.

Conditional models (class labels or prompts, :class:`schedules.conditioning.ConditionalAdapter`)
distill through the same adapter: the teacher data are its guided trajectories under per-sample
conditions, and the student — a copy of the same network under the same conditioning and guidance
scale — is trained on its guided output (:mod:`distill.base`, :mod:`distill.data`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.base import Batch, DistillMethod, straightening_loss
from distill.boss import BOSSStraightening
from distill.checkpoint import load_checkpoint, save_checkpoint
from distill.config import METHODS, DistillConfig
from distill.data import TeacherData, table_nodes
from distill.kstep import KStepDistillation
from distill.reflow import Reflow
from distill.student import LoraWeights, Student, build_student
from distill.workdir import LOSS_LOG, LossLog, cached_teacher_data, default_work_dir, prepare_work_dir, run_record
from schedules.adapters import ModelAdapter
from schedules.conditioning import conditioning_of
from schedules.couplings import Coupling
from schedules.io import StepsmithError, remove_stale_siblings
from schedules.table import TimestepTable

__all__ = ["DistillConfig", "DistillResult", "Training", "build_method", "distill", "learning_rate"]


@dataclass
class DistillResult:
    module: torch.nn.Module          # the distilled network (EMA weights, LoRA merged), on CPU
    adapter: ModelAdapter            # the teacher's adapter with the distilled module
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    lora: LoraWeights | None = None  # LoRA factors in diffusers' naming (pipeline networks with LoRA)


def build_method(name: str, data: TeacherData, tables: Sequence[TimestepTable], adapter: ModelAdapter,
                 coupling: Coupling | None = None) -> DistillMethod:
    conv = adapter.convention
    if name == "boss":
        return BOSSStraightening(data, tables, conv)
    if name == "reflow":
        return Reflow(data, conv, coupling)
    if name == "kstep":
        from schedules.baselines import uniform

        grid: list[float] = []
        for t in tables:
            if conv.name == "flow":
                grid += torch.linspace(data.nodes[0], 0.0, t.steps + 1, dtype=torch.float64).tolist()
            else:
                grid += uniform(adapter, t.steps, "euler").sigmas
        return KStepDistillation(data, grid, conv, coupling)
    raise StepsmithError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")


def learning_rate(config: DistillConfig, step: int) -> float:
    """The LR of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps, then constant."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s global batch (the same in every process and after a resume)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 12_345) % (2**63 - 1))


@torch.no_grad()
def validation_loss(student: ModelAdapter, batch: Batch, accelerator, chunk: int = 1024) -> float:
    """Mean straightening loss of ``student`` on ``batch`` (in eval mode, on this process)."""
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


@dataclass
class Training:
    """The optimisation loop of one run, from step ``start`` (0, or a checkpoint's) on."""

    config: DistillConfig
    method: DistillMethod
    student: Student
    accelerator: Any
    work: Path | None                # checkpoints and the loss log go here (None: neither)
    start: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    teacher_seconds: float = 0.0     # this run's teacher-data seconds (generated or read)
    earlier: dict[str, float] = field(default_factory=dict)  # cost of the runs this one resumed
    val_batch: Batch = field(init=False)  # the method's fixed held-out batch

    def __post_init__(self) -> None:
        self.val_batch = self.method.validation()

    def resume(self, ckpt: Path) -> None:
        self.start, self.history, self.earlier = load_checkpoint(ckpt, self.accelerator, self.student.ema)
        if self.accelerator.is_main_process:
            print(f"stepsmith distill: resumed from {ckpt} (step {self.start})")

    def val_loss(self) -> float:
        return validation_loss(self.student.adapter, self.val_batch, self.accelerator)

    def run(self, end: int) -> None:
        """Train steps ``start`` … ``end - 1``; log, evaluate and checkpoint on the way."""
        from tqdm.auto import tqdm

        cfg, main = self.config, self.accelerator.is_main_process
        log = self._open_log()
        bar = tqdm(total=cfg.steps, initial=self.start, desc=f"distill {cfg.method}",
                   disable=not (cfg.progress and main), dynamic_ncols=True)
        self.started = time.perf_counter()
        running: list[float] = []
        for step in range(self.start, end):
            running.append(self._step(step))
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = self._record(done, running)
                running = []
                if log is not None:
                    log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", **({"val": f"{rec['val_loss']:.4g}"} if "val_loss" in rec else {}))
            bar.update(1)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.checkpoint(done)
        bar.close()
        if log is not None:
            log.close()

    def _open_log(self) -> LossLog | None:
        """The loss log (continued on resume); a fresh run first records the step-0 validation loss."""
        fresh = self.start == 0
        if fresh:
            self.history.append({"step": 0, "val_loss": self.val_loss()})
        if self.work is None:
            return None
        log = LossLog(self.work, self.accelerator.is_main_process, append=not fresh, upto=self.start)
        if fresh:
            log.write({"step": 0, "loss": float("nan"), "val_loss": self.history[0]["val_loss"], "lr": 0.0,
                       "seconds": 0.0})
        return log

    def _step(self, step: int) -> float:
        """One optimizer step on this process's slice of the global batch; the loss averaged over processes."""
        cfg, acc, student = self.config, self.accelerator, self.student
        local = cfg.batch_size // acc.num_processes
        batch = self.method.draw(step_generator(cfg.seed, step), cfg.batch_size)
        batch = batch.slice(slice(acc.process_index * local, (acc.process_index + 1) * local)).to(acc.device)
        for group in student.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        with acc.autocast():
            loss = straightening_loss(student.adapter, batch)
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(student.params, cfg.grad_clip)
        student.optimizer.step()
        student.optimizer.zero_grad(set_to_none=True)
        student.update_ema()
        return float(acc.reduce(loss.detach(), reduction="mean"))

    def _record(self, done: int, running: list[float]) -> dict[str, float]:
        """The history entry after ``done`` steps: mean training loss since the last one, LR, time, and
        the validation loss every ``eval_every`` steps and at the end."""
        cfg = self.config
        rec = {"step": done, "loss": sum(running) / len(running), "lr": learning_rate(cfg, done - 1),
               "seconds": self.train_seconds()}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            rec["val_loss"] = self.val_loss()
        self.history.append(rec)
        return rec

    def checkpoint(self, done: int) -> None:
        if self.work is not None:
            save_checkpoint(self.work, done, self.accelerator, self.student.ema, self.history,
                            self.config.keep_checkpoints, cost=self.cost())

    def train_seconds(self) -> float:
        """Training seconds so far, the resumed runs' included."""
        return round(self.earlier.get("train_seconds", 0.0) + time.perf_counter() - self.started, 2)

    def cost(self) -> dict[str, float]:
        """Seconds spent so far (teacher data, training), the resumed runs' included; kept in checkpoints."""
        return {"train_seconds": self.train_seconds(),
                "teacher_seconds": round(self.earlier.get("teacher_seconds", 0.0) + self.teacher_seconds, 2)}

    def stop(self, end: int) -> None:
        """End a run cut short at step ``end``: checkpoint it (unless the loop just did)."""
        if end > self.start and end % self.config.checkpoint_every != 0:
            self.checkpoint(end)
        self.accelerator.wait_for_everyone()


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
    compare methods on identical teacher data). ``command`` is recorded in the output's
    ``distill.json`` (the CLI passes its invocation).
    """
    from distill.export import check_output_free

    tables = _check_inputs(adapter, tables, config)
    out = Path(out) if out is not None else None
    if out is not None:
        check_output_free(out, overwrite)
        remove_stale_siblings(out, ("tmp", "old"))  # a killed export's hidden folders
    work = Path(work_dir) if work_dir is not None else (default_work_dir(out) if out is not None else None)
    accelerator = accelerator if accelerator is not None else _accelerator(config)
    if config.batch_size % accelerator.num_processes:
        raise StepsmithError(f"`batch_size` {config.batch_size} is not divisible by the {accelerator.num_processes} "
                             "processes", param="batch_size")
    start_ckpt = None
    if work is not None:
        start_ckpt = prepare_work_dir(work, run_record(config, adapter, tables), accelerator, resume=resume,
                                      overwrite=overwrite)

    t0 = time.perf_counter()
    data = teacher_data if teacher_data is not None else cached_teacher_data(adapter, tables, config, work, accelerator)
    method = build_method(config.method, data, tables, adapter, Coupling(config.coupling, config.ot_batch))
    seconds_teacher = time.perf_counter() - t0

    training = Training(config, method, build_student(adapter, config, accelerator), accelerator, work,
                        teacher_seconds=seconds_teacher)
    if start_ckpt is not None:
        training.resume(start_ckpt)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    training.run(end)
    if end < config.steps:
        training.stop(end)
        return None
    result = _result(training, adapter, tables, data, command)
    result.out = _export(result, adapter, tables, out, work, accelerator, overwrite)
    return result


def _check_inputs(adapter: ModelAdapter, tables: TimestepTable | Sequence[TimestepTable],
                  config: DistillConfig) -> list[TimestepTable]:
    from distill.export import check_lora_export

    cond = conditioning_of(adapter)
    config.validate(conditional=cond is not None)
    check_lora_export(adapter, config.lora_rank)
    tables = [tables] if isinstance(tables, TimestepTable) else list(tables)
    if not tables:
        raise StepsmithError("give at least one timestep table (--table T.json)")
    for t in tables:
        t.check_compatible(adapter.convention, adapter.prediction, what=adapter.name)
        t.check_conditioning(cond)  # warns when searched for another guidance scale or condition set
    table_nodes(tables)
    return tables


def _accelerator(config: DistillConfig):
    """An ``Accelerator`` for this process (the CPU when there is no CUDA device)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())


def _result(training: Training, adapter: ModelAdapter, tables: list[TimestepTable], data: TeacherData,
            command: str | None) -> DistillResult:
    """The final validation losses (raw, then EMA weights), the distilled module and its record."""
    val_raw = training.val_loss()
    training.student.apply_ema()
    val_ema = training.val_loss()
    lora = training.student.lora_layers(training.accelerator)  # before final_module folds the factors in
    final = training.student.final_module(training.accelerator)
    cond = conditioning_of(adapter)
    info = {
        "method": training.method.describe(), "config": asdict(training.config), "model": adapter.name,
        "convention": adapter.describe(), "tables": [t.to_dict() for t in tables],
        "parameters": training.student.n_parameters, "trainable_parameters": training.student.n_trainable,
        "processes": training.accelerator.num_processes,
        "teacher_calls": data.teacher_calls, **training.cost(), "resumed_from_step": training.start or None, "final_val_loss_raw": val_raw,
        "final_val_loss": val_ema, "teacher_data": data.fingerprint, "command": command,
        "conditioning": None if cond is None else cond.describe(),
    }
    return DistillResult(module=final, adapter=dataclasses.replace(adapter, module=final, calls=0),
                         history=training.history, info=info, lora=lora)


def _export(result: DistillResult, adapter: ModelAdapter, tables: list[TimestepTable], out: Path | None,
            work: Path | None, accelerator, overwrite: bool) -> Path | None:
    """Write ``out`` (main process) and delete the work folder; the other processes wait."""
    if out is None:
        return None
    from distill.export import export_model

    if accelerator.is_main_process:
        export_model(adapter, result.module, tables, out, result.info, result.history, overwrite=overwrite,
                     loss_log=(work / LOSS_LOG) if work is not None else None, lora=result.lora)
        if work is not None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out
