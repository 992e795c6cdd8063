"""Benchmark: BOSS straightening vs reflow vs k-step distillation at equal training budget.

    python -m benchmarks.distill --out runs/distill-bench/toy2d.json
    python -m benchmarks.distill --model builtin:digits-flow --steps 300 --pairs 512 --batch-size 32 \\
        --teacher-steps 40 --eval-samples 1000 --out runs/distill-bench/digits.json

From Python: ``run_distill_bench(DistillBenchConfig(nfe=(1, 2)), out="d.json")``; ``stepsmith bench``
runs it as part P5. For every NFE K (default 1, 2, 4, 6) the DP table is
``make_table(adapter, "dp", K, "euler")`` (search seed 0). One teacher run (``pairs``
trajectories, noise seed 20 000, Heun on ``teacher_steps`` merged with the DP nodes) feeds every
student, so all methods see the same teacher samples, the same number of optimizer steps, batch
size and learning rate:

* ``teacher``  — the model itself with its DP table (and with the uniform table);
* ``boss@K``   — BOSS-straightened to the K-step DP table, sampled with that table;
* ``reflow``   — one 2-rectified flow (uniform t), sampled with the uniform table ("uniform
  reflow") and with the DP table;
* ``ot-reflow`` — the same reflow with the noises and teacher samples re-coupled by minibatch
  exact OT (``ot_batch`` pairs per OT problem; :class:`distill.base.TeacherPairs`), sampled likewise;
* ``kstep@K``  — k-step distillation on the uniform K-grid, sampled with that grid.

Quality on ``eval_samples`` from noise seed 10 000: toy2d → exact W2 to fresh ``toy2d_data``
(seed 10 001, POT via ``eval.metrics.wasserstein``); digits → FID on the ``digits-features``
network against all 1 797 digits (``eval.metrics.fid_from_features``), and KID on the same features
(``eval.metrics.kid_from_features``, subsets of min(1000, ``eval_samples``), seed 0). Also the L2 distance to the teacher's
``reference_steps``-step Heun sample from the same noise, and Liu et al.'s straightness
(``eval.metrics.flow_straightness``, ``straight_steps`` Euler steps) before/after. Results go to
``out`` (JSON, atomic, rewritten after every student) and, from the command line, a Markdown table
on stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.options import add_config_args, command_for, config_from_args

SEARCH_SEED, EVAL_SEED, DATA_SEED = 0, 10_000, 20_000
TEACHER_DATA_BATCH = 256


@dataclass(frozen=True)
class DistillBenchConfig:
    """What one distillation benchmark measures.

    The training budget (``steps``, ``batch_size``, ``lr``, ``pairs``) is the benchmark's own toy-2D
    protocol, not :class:`distill.trainer.DistillConfig`'s defaults; the other training settings are
    passed through to it unchanged.
    """

    model: str = field(default="builtin:toy2d-flow", metadata={"help": "a builtin: model, diffusers folder or file.py:attr"})
    nfe: tuple[int, ...] = field(default=(1, 2, 4, 6), metadata={"help": "step counts K, one table and student each"})
    methods: tuple[str, ...] = field(default=("boss", "reflow", "kstep"),
                                     metadata={"help": "students to train (also: ot-reflow)"})
    table_method: str = field(default="dp", metadata={"help": "make_table method of the K-step tables"})
    search_samples: int = field(default=64, metadata={"help": "search samples of the table search"})
    table_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": 'JSON options for make_table, e.g. {"grid": 50}'})
    reference_steps: int = field(default=100, metadata={"help": "Heun steps of the teacher reference sample"})
    straight_steps: int = field(default=100, metadata={"help": "Euler steps of the straightness integral"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps per student"})
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = field(default=100, metadata={"help": "linear LR warm-up steps"})
    ema_decay: float = 0.999
    lora_rank: int = field(default=0, metadata={"help": "0 = full fine-tuning"})
    pairs: int = field(default=20_000, metadata={"help": "teacher trajectories shared by every student"})
    ot_batch: int = field(default=0, metadata={"help": "pairs per OT problem of the ot-reflow student (0: the batch)"})
    teacher_steps: int = field(default=100, metadata={"help": "fine grid of the teacher, merged with the table nodes"})
    eval_samples: int = field(default=2000, metadata={"help": "held-out samples per quality cell"})
    straight_samples: int = field(default=500, metadata={"help": "samples of the straightness integral"})

    def training(self, method: str, coupling: str = "independent"):
        """The :class:`distill.trainer.DistillConfig` of one student."""
        from distill.trainer import DistillConfig

        every = max(1, self.steps // 10)
        ot = {} if coupling == "independent" else {"coupling": coupling, "ot_batch": self.ot_batch or None}
        return DistillConfig(method=method, **ot, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                             warmup=self.warmup, ema_decay=self.ema_decay, lora_rank=self.lora_rank, pairs=self.pairs,
                             teacher_steps=self.teacher_steps, seed=DATA_SEED, progress=False, log_every=every,
                             eval_every=every)


def build_tables(adapter, cfg: DistillBenchConfig):
    """Per NFE: the searched table, the uniform table, and what the search found and took."""
    from schedules.baselines import uniform
    from schedules.search import make_table

    dp, uni, info = {}, {}, {}
    for k in cfg.nfe:
        t0 = time.perf_counter()
        dp[k] = make_table(adapter, cfg.table_method, k, "euler", samples=cfg.search_samples, seed=SEARCH_SEED,
                           **cfg.table_options)
        info[k] = {"sigmas": dp[k].sigmas, "method": dp[k].method, "seconds": round(time.perf_counter() - t0, 1)}
        uni[k] = uniform(adapter, k, "euler")
    return dp, uni, info


class Evaluator:
    """Held-out noises, the teacher's reference samples from them, and the quality metric."""

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
            from eval.metrics import extract_features
            from schedules.embedded.nets import digits_data

            self.kind, self.real = "fid", digits_data()[0]
            self.net = load_feature_network("digits-features")
            self.real_features = extract_features(self.net, self.real)  # once, not per scored cell

    def scores(self, x: torch.Tensor) -> dict[str, float]:
        """The quality metric of samples ``x`` (toy2d: ``w2``; images: ``fid`` and ``kid``, the KID mean)."""
        from eval import metrics

        if self.kind == "w2":
            return {"w2": metrics.wasserstein(x, self.real)}
        fake = metrics.extract_features(self.net, x.clamp(-1, 1))
        return {"fid": metrics.fid_from_features(self.real_features, fake),
                "kid": metrics.kid_from_features(self.real_features, fake)[0]}

    def quality(self, x: torch.Tensor) -> float:
        return self.scores(x)[self.kind]

    def evaluate(self, model, sigmas) -> dict:
        from schedules.solvers import sample

        x = sample(model, self.noise, sigmas, "euler")
        # teacher_l2 as eval.metrics defines it: root-mean-square over samples of the per-sample L2 distance.
        l2 = float(((x - self.reference) ** 2).flatten(1).sum(1).mean().sqrt())
        return {**self.scores(x), "teacher_l2": l2}

    def straightness(self, model) -> float | None:
        """Straightness of a flow model (``None`` for other conventions)."""
        from eval.metrics import flow_straightness

        if model.convention.name != "flow":
            return None
        return flow_straightness(model, self.straight_noise, steps=self.straight_steps)


@dataclass
class _Run:
    """One benchmark run in progress: the shared teacher data, and the rows and students so far."""

    cfg: DistillBenchConfig
    adapter: Any
    data: Any
    ev: Evaluator
    log: Callable[..., None]
    rows: list[dict] = field(default_factory=list)
    runs: dict[str, dict] = field(default_factory=dict)

    def add(self, model_name: str, model, table_name: str, k: int, sigmas) -> None:
        r = {"model": model_name, "table": table_name, "nfe": k, **self.ev.evaluate(model, sigmas)}
        self.rows.append(r)
        self.log(json.dumps(r))

    def train(self, name: str, method: str, tables, coupling: str = "independent"):
        from distill.trainer import distill

        t0 = time.perf_counter()
        res = distill(self.adapter, tables, self.cfg.training(method, coupling), None, teacher_data=self.data)
        self.runs[name] = {"seconds": round(time.perf_counter() - t0, 1), "val_loss_start": res.history[0]["val_loss"],
                           "val_loss_end": res.info["final_val_loss"],
                           "trainable_parameters": res.info["trainable_parameters"],
                           "straightness": self.ev.straightness(res.adapter)}
        self.log(name, json.dumps(self.runs[name]))
        return res.adapter


def run_distill_bench(cfg: DistillBenchConfig = DistillBenchConfig(), out: str | Path | None = None, *,
                      command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train and score every student of ``cfg``; returns the result (also written to ``out``, if given).

    ``command`` is recorded as the command that reproduces the file (default: the
    ``python -m benchmarks.distill`` line for ``cfg``).
    """
    from distill.data import generate_teacher_data
    from schedules.adapters import load_model

    t_start = time.perf_counter()
    log = _logger(t_start, progress)
    adapter = load_model(cfg.model)
    dp, uni, table_info = build_tables(adapter, cfg)
    log("tables", {k: [round(v, 4) for v in t.sigmas] for k, t in dp.items()})
    t0 = time.perf_counter()
    data = generate_teacher_data(adapter, list(dp.values()), cfg.pairs, seed=DATA_SEED, teacher_steps=cfg.teacher_steps,
                                 teacher_solver="heun", batch_size=TEACHER_DATA_BATCH)
    teacher_seconds = time.perf_counter() - t0
    log(f"teacher data: {cfg.pairs} trajectories, {len(data.nodes)} nodes, {teacher_seconds:.1f}s")
    ev = Evaluator(adapter, cfg.eval_samples, cfg.straight_samples, cfg.reference_steps, cfg.straight_steps)
    log(f"reference samples: {ev.ref_seconds:.1f}s")
    run = _Run(cfg, adapter, data, ev, log)
    command = command or default_command(cfg, out)
    straight = {"teacher": ev.straightness(adapter)}
    log("teacher straightness", straight["teacher"])

    def write(ref_q: dict[str, float] | None = None) -> dict[str, Any]:
        result = _result(run, command, straight, table_info, teacher_seconds, time.perf_counter() - t_start, ref_q)
        result["config"]["out"] = None if out is None else str(out)
        if out is not None:
            from schedules.io import atomic_write_json

            atomic_write_json(out, result)
        return result

    _train_all(run, dp, uni, write)
    return write(ev.scores(ev.reference))


def _train_all(run: _Run, dp: dict, uni: dict, write: Callable[[], Any]) -> None:
    """Score the teacher, then train and score every student; ``write`` saves the results so far."""
    nfes, methods = run.cfg.nfe, run.cfg.methods
    for k in nfes:
        run.add("teacher", run.adapter, "dp", k, dp[k].sigmas)
        run.add("teacher", run.adapter, "uniform", k, uni[k].sigmas)
    for name, coupling in (("reflow", "independent"), ("ot-reflow", "ot")):
        if name in methods:
            m = run.train(name, "reflow", list(dp.values()), coupling)
            for k in nfes:
                run.add(name, m, "uniform", k, uni[k].sigmas)
                run.add(name, m, "dp", k, dp[k].sigmas)
            write()
    for k in nfes:
        if "boss" in methods:
            m = run.train(f"boss@{k}", "boss", [dp[k]])
            run.add(f"boss@{k}", m, "dp", k, dp[k].sigmas)
        if "kstep" in methods:
            if k == 1 and f"boss@{k}" in run.runs and abs(dp[k].sigmas[0] - run.data.s_max) < 1e-9:
                # one step from σ_max: BOSS's only segment (σ=1 → 0) and the 1-grid give the same
                # examples, targets and batch stream, so the trained model is identical; reuse it
                run.runs["kstep@1"] = {**run.runs["boss@1"], "same_as": "boss@1"}
                run.add("kstep@1", m, "uniform", k, uni[k].sigmas)
            else:
                m = run.train(f"kstep@{k}", "kstep", [dp[k]])
                run.add(f"kstep@{k}", m, "uniform", k, uni[k].sigmas)
        write()


def _result(run: _Run, command: str, straight: dict, table_info: dict, teacher_seconds: float, seconds: float,
            ref_q: dict[str, float] | None) -> dict[str, Any]:
    cfg, kind = run.cfg, run.ev.kind
    result = {
        "command": command,
        "metric": kind, "eval_samples": cfg.eval_samples, "eval_seed": EVAL_SEED, "data_seed": DATA_SEED,
        "reference_quality": None if ref_q is None else ref_q[kind],
        **({"reference_kid": ref_q["kid"]} if ref_q and "kid" in ref_q else {}),
        "teacher_data_seconds": round(teacher_seconds, 1), "tables": table_info,
        "straightness": {"teacher": straight["teacher"], **{k: v["straightness"] for k, v in run.runs.items()}},
        "runs": run.runs, "rows": run.rows, "seconds": round(seconds, 1),
        "config": {**asdict(cfg), "threads": torch.get_num_threads()},
    }
    result["boss_over_uniform_reflow"] = boss_over_uniform_reflow(run.rows, cfg.nfe, kind)
    return result


def boss_over_uniform_reflow(rows: list[dict], nfes, kind: str) -> dict[int, float]:
    """Per NFE: the BOSS student's metric ÷ the uniform-table reflow student's."""
    ratios = {}
    for k in nfes:
        b = next((r for r in rows if r["model"] == f"boss@{k}"), None)
        rf = next((r for r in rows if r["model"] == "reflow" and r["table"] == "uniform" and r["nfe"] == k), None)
        if b and rf and rf[kind] > 0:
            ratios[k] = b[kind] / rf[kind]
    return ratios


def _teacher_l2(row: dict) -> float:
    return row["teacher_l2"] if "teacher_l2" in row else row["teacher_rmse"]


def markdown(result: dict) -> str:
    """The result as a Markdown table (cells: metric (L2 distance to the teacher)) plus straightness and ratios.

    Results written before the metric was named ``teacher_l2`` store the same quantity as ``teacher_rmse``.
    """
    kind = result["metric"]
    lines = _table(result["rows"], lambda r: f"{r[kind]:.4g} ({_teacher_l2(r):.3g})")
    ref_steps = result.get("config", {}).get("reference_steps", 100)
    lines.append(f"\n{kind} (L2 distance to the teacher's {ref_steps}-step Heun sample); reference sampler {kind}: "
                 f"{result['reference_quality']}")
    if all("kid" in r for r in result["rows"]):
        lines += ["", "KID (mean over subsets) on the same samples:", ""] + _table(result["rows"], lambda r: f"{r['kid']:.4g}")
        lines.append(f"\nreference sampler KID: {result['reference_kid']:.4g}")
    lines.append("straightness: " + ", ".join(f"{k} {v:.4g}" for k, v in result["straightness"].items() if v is not None))
    lines.append("BOSS / uniform reflow: " + ", ".join(f"NFE {k}: {v:.3f}" for k, v in result["boss_over_uniform_reflow"].items()))
    if all("kid" in r for r in result["rows"]):
        nfes = sorted({r["nfe"] for r in result["rows"]})
        kid = boss_over_uniform_reflow(result["rows"], nfes, "kid")
        lines.append("BOSS / uniform reflow (KID): " + ", ".join(f"NFE {k}: {v:.3f}" for k, v in kid.items()))
    ref = result.get("reference_quality")
    if kind == "fid" and ref:
        # each student with the table it is sampled with: BOSS its DP table, the others the uniform one
        top = max(r["nfe"] for r in result["rows"])
        over = [f"{r['model']} {r[kind] / ref:.2f}" for r in result["rows"] if r["model"] != "teacher" and r["nfe"] == top
                and (r["table"] == "dp") == r["model"].startswith("boss")]
        lines.append(f"NFE {top} student fid / reference sampler fid: " + ", ".join(over))
    return "\n".join(lines)


def _table(rows: list[dict], cell: Callable[[dict], str]) -> list[str]:
    """A Markdown table, one line per (model without ``@K``, table) and one column per NFE."""
    nfes = sorted({r["nfe"] for r in rows})
    keys = []
    for r in rows:
        key = (r["model"].split("@")[0], r["table"])
        if key not in keys:
            keys.append(key)
    lines = ["| model | table | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    for model, table in keys:
        cells = []
        for k in nfes:
            r = next((r for r in rows if r["model"].split("@")[0] == model and r["table"] == table and r["nfe"] == k),
                     None)
            cells.append("" if r is None else cell(r))
        lines.append(f"| {model} | {table} | " + " | ".join(cells) + " |")
    return lines


def cli_command(cfg: DistillBenchConfig, *extra: str) -> str:
    """The ``python -m benchmarks.distill`` line for ``cfg`` (``extra``: more flags, e.g. ``--out``)."""
    return command_for("benchmarks.distill", cfg, *extra, always=("model",))


def default_command(cfg: DistillBenchConfig, out: str | Path | None) -> str:
    """The command line that reruns ``cfg`` with this process's thread count, writing ``out``."""
    extra = ["--threads", str(torch.get_num_threads())] + (["--out", str(out)] if out is not None else [])
    return cli_command(cfg, *extra)


def _logger(t_start: float, enabled: bool) -> Callable[..., None]:
    def log(*msg) -> None:
        if enabled:
            print(f"[{time.perf_counter() - t_start:7.1f}s]", *msg, file=sys.stderr, flush=True)

    return log


def build_parser() -> argparse.ArgumentParser:
    """``python -m benchmarks.distill``: one flag per :class:`DistillBenchConfig` field, plus threads and output."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, DistillBenchConfig)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    result = run_distill_bench(config_from_args(DistillBenchConfig, a), a.out,
                               command=shlex.join(["python", "-m", "benchmarks.distill", *argv]))
    print(markdown(result))


if __name__ == "__main__":
    main()
