"""Run-time cost of plugging a table into a diffusers pipeline.

Same pipeline, same batch, same NFE: the pipeline's default schedule versus a stepsmith
table passed through :func:`schedules.diffusers_integration.pipeline_kwargs` (the
``pipeline_kwargs`` call is inside the timed region). Runs are interleaved (ABBA order) after
a warm-up; the script prints the median seconds per call and the ratio plugged/default
(target ≤ 1.02), on wall-clock and on process CPU time (less sensitive to other processes
sharing the cores)::

    python eval/bench_overhead.py --nfe 8 --batch 8 --repeats 20

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

import torch


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


def bench(which: str, nfe: int, batch: int, repeats: int, warmup: int) -> dict:
    from schedules.diffusers_integration import pipeline_kwargs, remove_table

    pipe, _, make = _pipes(which)
    table = make(nfe)
    original = pipe.scheduler
    calls = {"n": 0}
    unet = pipe.unet
    hook = unet.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def default() -> None:
        remove_table(pipe)
        pipe(batch_size=batch, num_inference_steps=nfe, generator=torch.Generator().manual_seed(0), output_type="np")

    def plugged() -> None:
        kw = pipeline_kwargs(table, pipe)
        pipe(batch_size=batch, generator=torch.Generator().manual_seed(0), output_type="np", **kw)

    def timed(fn) -> tuple[float, float, int]:
        calls["n"] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0, calls["n"]

    for _ in range(warmup):
        timed(default)
        timed(plugged)
    times: dict[str, list[float]] = {"default": [], "plugged": []}
    cpu: dict[str, list[float]] = {"default": [], "plugged": []}
    ncalls: dict[str, set[int]] = {"default": set(), "plugged": set()}
    order = [("default", default), ("plugged", plugged)]
    for r in range(repeats):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            dt, dc, n = timed(fn)
            times[name].append(dt)
            cpu[name].append(dc)
            ncalls[name].add(n)
    hook.remove()
    kw_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        pipeline_kwargs(table, pipe)
        kw_times.append(time.perf_counter() - t0)
    remove_table(pipe)
    assert pipe.scheduler is original
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "pipeline": type(pipe).__name__, "model": f"builtin:digits-{which}", "nfe": nfe, "batch": batch,
        "repeats": repeats, "table": f"{table.method} {table.solver}", "unet_calls": {k: sorted(v) for k, v in ncalls.items()},
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_plugged_over_default": round(med["plugged"] / med["default"], 4),
        "median_cpu_s": {k: round(v, 5) for k, v in med_cpu.items()},
        "cpu_ratio_plugged_over_default": round(med_cpu["plugged"] / med_cpu["default"], 4),
        "min_ratio_wall": round(min(times["plugged"]) / min(times["default"]), 4),
        "min_ratio_cpu": round(min(cpu["plugged"]) / min(cpu["default"]), 4),
        "pipeline_kwargs_ms": round(1000 * statistics.median(kw_times), 3),
        "ratio_of_means": round(statistics.fmean(times["plugged"]) / statistics.fmean(times["default"]), 4),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", default="flow,ddpm", help="comma list of flow, ddpm")
    p.add_argument("--nfe", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.getLogger("stepsmith.diffusers").setLevel(logging.ERROR)  # the swap notice would repeat every call
    for which in a.pipelines.split(","):
        print(json.dumps(bench(which.strip(), a.nfe, a.batch, a.repeats, a.warmup)), flush=True)


if __name__ == "__main__":
    main()
