"""Run-time cost of plugging a table into a diffusers pipeline.

Same pipeline, same batch, same NFE: the pipeline's default schedule versus a stepsmith
table passed through :func:`schedules.diffusers.pipeline_kwargs` (the
``pipeline_kwargs`` call is inside the timed region). Runs are interleaved (ABBA order) after
a warm-up; the result holds the median seconds per call and the ratio plugged/default
(target ≤ 1.02), on wall-clock and on process CPU time (less sensitive to other processes
sharing the cores)::

    python -m benchmarks.overhead --nfe 8 --batch 8 --repeats 20

* ``flow``: :class:`schedules.pipeline.UnconditionalFlowMatchPipeline` on builtin:digits-flow,
  default FlowMatchEuler schedule vs a karras-spaced table (``sigmas=`` path).
* ``ddpm``: ``DDPMPipeline`` on builtin:digits-ddpm, default DDPMScheduler schedule vs a
  karras-spaced DDIM table with fractional timesteps (the table is installed on a pinned
  DPMSolverMultistep scheduler and ``num_inference_steps`` is passed). The default run here
  uses diffusers' DDPMScheduler, so scheduler arithmetic differs besides the schedule.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.options import add_config_args, config_from_args


@dataclass(frozen=True)
class OverheadConfig:
    """Which pipelines to time, at which NFE and batch, how many interleaved repeats after a warm-up."""

    pipelines: tuple[str, ...] = ("flow", "ddpm")
    nfe: int = 8
    batch: int = 8
    repeats: int = 20
    warmup: int = 2


def _pipes(which: str):
    from diffusers import DDPMPipeline

    from schedules.adapters import load_model
    from schedules.baselines import karras
    from schedules.embedded import embedded_path
    from schedules.pipeline import UnconditionalFlowMatchPipeline

    if which == "flow":
        pipe = UnconditionalFlowMatchPipeline.from_pretrained(embedded_path("digits-flow"))
        adapter = load_model("builtin:digits-flow", probe=False)
        solver = "euler"
    else:
        pipe = DDPMPipeline.from_pretrained(embedded_path("digits-ddpm"), use_safetensors=True)
        adapter = load_model("builtin:digits-ddpm", probe=False)
        solver = "ddim"
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter, lambda nfe: karras(adapter, nfe, solver)


def _interleaved(runs: dict[str, Callable[[], None]], calls: dict[str, int], repeats: int,
                 warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, set[int]]]:
    """Wall seconds, CPU seconds and UNet call counts per run, in ABBA order after ``warmup`` rounds."""

    def timed(fn) -> tuple[float, float, int]:
        calls["n"] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0, calls["n"]

    for _ in range(warmup):
        for fn in runs.values():
            timed(fn)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    ncalls: dict[str, set[int]] = {k: set() for k in runs}
    order = list(runs.items())
    for r in range(repeats):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            dt, dc, n = timed(fn)
            wall[name].append(dt)
            cpu[name].append(dc)
            ncalls[name].add(n)
    return wall, cpu, ncalls


def measure(which: str, nfe: int, batch: int, repeats: int, warmup: int) -> dict:
    """Time the ``which`` pipeline (``flow`` or ``ddpm``) with its default schedule and with a plugged table."""
    from schedules.diffusers import pipeline_kwargs, remove_table

    pipe, _, make = _pipes(which)
    table = make(nfe)
    original = pipe.scheduler
    calls = {"n": 0}
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def default() -> None:
        remove_table(pipe)
        pipe(batch_size=batch, num_inference_steps=nfe, generator=torch.Generator().manual_seed(0), output_type="np")

    def plugged() -> None:
        kw = pipeline_kwargs(table, pipe)
        pipe(batch_size=batch, generator=torch.Generator().manual_seed(0), output_type="np", **kw)

    wall, cpu, ncalls = _interleaved({"default": default, "plugged": plugged}, calls, repeats, warmup)
    hook.remove()
    kw_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        pipeline_kwargs(table, pipe)
        kw_times.append(time.perf_counter() - t0)
    remove_table(pipe)
    assert pipe.scheduler is original
    return {"pipeline": type(pipe).__name__, "model": f"builtin:digits-{which}", "nfe": nfe, "batch": batch,
            "repeats": repeats, "table": f"{table.method} {table.solver}",
            "unet_calls": {k: sorted(v) for k, v in ncalls.items()}, **_summary(wall, cpu),
            "pipeline_kwargs_ms": round(1000 * statistics.median(kw_times), 3),
            "ratio_of_means": round(statistics.fmean(wall["plugged"]) / statistics.fmean(wall["default"]), 4)}


def _summary(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_plugged_over_default": round(med["plugged"] / med["default"], 4),
        "median_cpu_s": {k: round(v, 5) for k, v in med_cpu.items()},
        "cpu_ratio_plugged_over_default": round(med_cpu["plugged"] / med_cpu["default"], 4),
        "min_ratio_wall": round(min(wall["plugged"]) / min(wall["default"]), 4),
        "min_ratio_cpu": round(min(cpu["plugged"]) / min(cpu["default"]), 4),
    }


def run_overhead(cfg: OverheadConfig = OverheadConfig()) -> list[dict]:
    """One :func:`measure` result per pipeline of ``cfg``."""
    return [measure(w.strip(), cfg.nfe, cfg.batch, cfg.repeats, cfg.warmup) for w in cfg.pipelines]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, OverheadConfig)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.getLogger("stepsmith.diffusers").setLevel(logging.ERROR)  # the swap notice would repeat every call
    for result in run_overhead(config_from_args(OverheadConfig, a)):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
