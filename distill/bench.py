"""Benchmark: BOSS straightening vs reflow vs k-step distillation at equal training budget.

    python -m distill.bench --model builtin:toy2d-flow --out runs/distill-bench/toy2d.json
    python -m distill.bench --model builtin:digits-flow --steps 300 --pairs 512 --batch-size 32 \\
        --teacher-steps 40 --eval-samples 1000 --out runs/distill-bench/digits.json

For every NFE K (default 1, 2, 4, 6) the DP table is ``make_table(adapter, "dp", K, "euler")``
(search seed 0). One teacher run (``--pairs`` trajectories, noise seed 20 000, Heun on
``--teacher-steps`` merged with the DP nodes) feeds every student, so all methods see the
same teacher samples, the same number of optimizer steps, batch size and learning rate:

* ``teacher``  — the model itself with its DP table (and with the uniform table);
* ``boss@K``   — BOSS-straightened to the K-step DP table, sampled with that table;
* ``reflow``   — one 2-rectified flow (uniform t), sampled with the uniform table ("uniform
  reflow") and with the DP table;
* ``kstep@K``  — k-step distillation on the uniform K-grid, sampled with that grid.

Quality on ``--eval-samples`` from noise seed 10 000: toy2d → exact W2 to fresh
``toy2d_data`` (seed 10 001, POT via ``eval.metrics.wasserstein``); digits → FID on the
``digits-features`` network against all 1 797 digits (``eval.metrics.fid``). Also the RMSE
to the teacher's 100-step Heun sample from the same noise, and Liu et al.'s straightness
(``eval.metrics.flow_straightness``, 100 Euler steps) before/after. Results go to ``--out``
(JSON, atomic) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SEARCH_SEED, EVAL_SEED, DATA_SEED = 0, 10_000, 20_000


def build_tables(adapter, nfes, method: str, search_samples: int, options: dict):
    from schedules.baselines import uniform

    dp, uni, info = {}, {}, {}
    for k in nfes:
        t0 = time.perf_counter()
        try:
            from schedules.search import make_table

            dp[k] = make_table(adapter, method, k, "euler", samples=search_samples, seed=SEARCH_SEED, **options)
        except ImportError:
            dp[k] = uniform(adapter, k, "euler")
        info[k] = {"sigmas": dp[k].sigmas, "method": dp[k].method, "seconds": round(time.perf_counter() - t0, 1)}
        uni[k] = uniform(adapter, k, "euler")
    return dp, uni, info


class Evaluator:
    def __init__(self, adapter, n: int, straight_n: int, reference_steps: int = 100, straight_steps: int = 100):
        from schedules.solvers import reference_sample

        self.adapter = adapter
        self.noise = adapter.noise(n, EVAL_SEED)
        t0 = time.perf_counter()
        self.reference = reference_sample(adapter, self.noise, reference_steps)
        self.straight_steps = straight_steps
        self.ref_seconds = time.perf_counter() - t0
        self.straight_noise = adapter.noise(straight_n, EVAL_SEED + 1)
        if adapter.sample_shape == (2,):
            from schedules.embedded.nets import toy2d_data

            self.kind, self.real = "w2", toy2d_data(n, seed=EVAL_SEED + 1)
        else:
            from eval.features import load_feature_network
            from schedules.embedded.nets import digits_data

            self.kind, self.real = "fid", digits_data()[0]
            self.net = load_feature_network("digits-features")

    def quality(self, x: torch.Tensor) -> float:
        from eval import metrics

        if self.kind == "w2":
            return metrics.wasserstein(x, self.real)
        with torch.no_grad():
            return metrics.fid(self.real, x.clamp(-1, 1), self.net)

    def evaluate(self, model, sigmas) -> dict:
        from schedules.solvers import sample

        x = sample(model, self.noise, sigmas, "euler")
        rmse = float(((x - self.reference) ** 2).flatten(1).sum(1).mean().sqrt())
        return {self.kind: self.quality(x), "teacher_rmse": rmse}

    def straightness(self, model) -> float:
        from eval.metrics import flow_straightness

        return flow_straightness(model, self.straight_noise, steps=self.straight_steps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:toy2d-flow")
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 6])
    p.add_argument("--methods", nargs="+", default=["boss", "reflow", "kstep"])
    p.add_argument("--table-method", default="dp")
    p.add_argument("--search-samples", type=int, default=64)
    p.add_argument("--table-options", type=json.loads, default={}, help='JSON options for make_table, e.g. {"grid": 50}')
    p.add_argument("--reference-steps", type=int, default=100, help="Heun steps of the teacher reference sample")
    p.add_argument("--straight-steps", type=int, default=100, help="Euler steps of the straightness integral")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--pairs", type=int, default=20_000)
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--straight-samples", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from distill.data import generate_teacher_data
    from distill.trainer import DistillConfig, distill
    from schedules.adapters import load_model
    from schedules.io import atomic_write_json

    t_start = time.perf_counter()
    adapter = load_model(a.model)
    log = lambda *m: print(f"[{time.perf_counter() - t_start:7.1f}s]", *m, file=sys.stderr, flush=True)  # noqa: E731
    dp, uni, table_info = build_tables(adapter, a.nfe, a.table_method, a.search_samples, a.table_options)
    log("tables", {k: [round(v, 4) for v in t.sigmas] for k, t in dp.items()})
    t0 = time.perf_counter()
    data = generate_teacher_data(adapter, list(dp.values()), a.pairs, seed=DATA_SEED, teacher_steps=a.teacher_steps,
                                 teacher_solver="heun", batch_size=256)
    teacher_seconds = time.perf_counter() - t0
    log(f"teacher data: {a.pairs} trajectories, {len(data.nodes)} nodes, {teacher_seconds:.1f}s")
    ev = Evaluator(adapter, a.eval_samples, a.straight_samples, a.reference_steps, a.straight_steps)
    log(f"reference samples: {ev.ref_seconds:.1f}s")

    def cfg(method: str) -> DistillConfig:
        return DistillConfig(method=method, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                             ema_decay=a.ema_decay, lora_rank=a.lora_rank, pairs=a.pairs, teacher_steps=a.teacher_steps,
                             seed=DATA_SEED, progress=False, log_every=max(1, a.steps // 10), eval_every=max(1, a.steps // 10))

    rows: list[dict] = []
    runs: dict[str, dict] = {}

    def add(model_name: str, model, table_name: str, k: int, sigmas) -> None:
        r = {"model": model_name, "table": table_name, "nfe": k, **ev.evaluate(model, sigmas)}
        rows.append(r)
        log(json.dumps(r))

    def train(name: str, method: str, tables) -> object:
        t0 = time.perf_counter()
        res = distill(adapter, tables, cfg(method), None, teacher_data=data)
        runs[name] = {"seconds": round(time.perf_counter() - t0, 1), "val_loss_start": res.history[0]["val_loss"],
                      "val_loss_end": res.info["final_val_loss"], "trainable_parameters": res.info["trainable_parameters"],
                      "straightness": ev.straightness(res.adapter) if adapter.convention.name == "flow" else None}
        log(name, json.dumps(runs[name]))
        return res.adapter

    straight = {"teacher": ev.straightness(adapter) if adapter.convention.name == "flow" else None}
    log("teacher straightness", straight["teacher"])
    for k in a.nfe:
        add("teacher", adapter, "dp", k, dp[k].sigmas)
        add("teacher", adapter, "uniform", k, uni[k].sigmas)
    if "reflow" in a.methods:
        m = train("reflow", "reflow", list(dp.values()))
        for k in a.nfe:
            add("reflow", m, "uniform", k, uni[k].sigmas)
            add("reflow", m, "dp", k, dp[k].sigmas)
        _write(a, rows, runs, straight, table_info, teacher_seconds, ev, t_start, atomic_write_json)
    for k in a.nfe:
        if "boss" in a.methods:
            m = train(f"boss@{k}", "boss", [dp[k]])
            add(f"boss@{k}", m, "dp", k, dp[k].sigmas)
        if "kstep" in a.methods:
            if k == 1 and f"boss@{k}" in runs:
                # one step: BOSS's only segment (σ=1 → 0) and the 1-grid give the same examples,
                # targets and batch stream, so the trained model is identical; reuse it
                runs["kstep@1"] = {**runs["boss@1"], "same_as": "boss@1"}
                add("kstep@1", m, "uniform", k, uni[k].sigmas)
            else:
                m = train(f"kstep@{k}", "kstep", [dp[k]])
                add(f"kstep@{k}", m, "uniform", k, uni[k].sigmas)
        _write(a, rows, runs, straight, table_info, teacher_seconds, ev, t_start, atomic_write_json)
    ref_q = ev.quality(ev.reference)
    result = _write(a, rows, runs, straight, table_info, teacher_seconds, ev, t_start, atomic_write_json, ref_q)
    print(markdown(result))


def _write(a, rows, runs, straight, table_info, teacher_seconds, ev, t_start, writer, ref_q=None) -> dict:
    result = {
        "command": "python -m distill.bench " + " ".join(sys.argv[1:]),
        "metric": ev.kind, "eval_samples": a.eval_samples, "eval_seed": EVAL_SEED, "data_seed": DATA_SEED,
        "reference_quality": ref_q, "teacher_data_seconds": round(teacher_seconds, 1), "tables": table_info,
        "straightness": {"teacher": straight["teacher"], **{k: v["straightness"] for k, v in runs.items()}},
        "runs": runs, "rows": rows, "seconds": round(time.perf_counter() - t_start, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
    }
    ratios = {}
    for k in a.nfe:
        b = next((r for r in rows if r["model"] == f"boss@{k}"), None)
        rf = next((r for r in rows if r["model"] == "reflow" and r["table"] == "uniform" and r["nfe"] == k), None)
        if b and rf and rf[ev.kind] > 0:
            ratios[k] = b[ev.kind] / rf[ev.kind]
    result["boss_over_uniform_reflow"] = ratios
    writer(a.out, result)
    return result


def markdown(result: dict) -> str:
    kind = result["metric"]
    nfes = sorted({r["nfe"] for r in result["rows"]})
    keys = []
    for r in result["rows"]:
        key = (r["model"].split("@")[0], r["table"])
        if key not in keys:
            keys.append(key)
    lines = ["| model | table | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    for model, table in keys:
        cells = []
        for k in nfes:
            r = next((r for r in result["rows"] if r["model"].split("@")[0] == model and r["table"] == table
                      and r["nfe"] == k), None)
            cells.append("" if r is None else f"{r[kind]:.4g} ({r['teacher_rmse']:.3g})")
        lines.append(f"| {model} | {table} | " + " | ".join(cells) + " |")
    ref_steps = result.get("config", {}).get("reference_steps", 100)
    lines.append(f"\n{kind} (RMSE to the teacher's {ref_steps}-step Heun sample); reference sampler {kind}: "
                 f"{result['reference_quality']}")
    lines.append("straightness: " + ", ".join(f"{k} {v:.4g}" for k, v in result["straightness"].items() if v is not None))
    lines.append("BOSS / uniform reflow: " + ", ".join(f"NFE {k}: {v:.3f}" for k, v in result["boss_over_uniform_reflow"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
