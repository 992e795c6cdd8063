"""Benchmark: fresh toy 2-D flows trained with the independent vs the minibatch-OT coupling at equal steps.

    python -m benchmarks.couplings --steps 3000 --batch-size 256 --ot-batch 256 --out runs/couplings/toy2d.json

Each coupling trains a fresh ``Toy2DVelocity`` with the embedded trainer
(:func:`schedules.embedded.train.train`, same seed, steps, batch and learning rate; only the
pairing of noise and data differs) and is scored on ``eval_samples`` held-out noises (seed 10 000):
Liu et al.'s straightness (``eval.metrics.flow_straightness``, 100 Euler steps from σ = 1) and the
exact W2 (POT) to fresh moons (seed 10 001) after 1, 2 and 100 uniform Euler steps.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.options import add_config_args, config_from_args

EVAL_SEED = 10_000


@dataclass(frozen=True)
class CouplingBenchConfig:
    couplings: tuple[str, ...] = field(default=("independent", "ot"), metadata={"help": "couplings to train"})
    steps: int = field(default=3000, metadata={"help": "optimizer steps per model"})
    batch_size: int = 256
    ot_batch: int = field(default=256, metadata={"help": "pairs per OT problem"})
    lr: float = 1e-3
    seed: int = 0
    nfe: tuple[int, ...] = field(default=(1, 2, 100), metadata={"help": "uniform Euler step counts scored"})
    eval_samples: int = 2000


def _adapter(module: torch.nn.Module, name: str):
    from schedules.adapters import ModelAdapter
    from schedules.conventions import FlowConvention

    return ModelAdapter(module=module.eval(), convention=FlowConvention(1.0), prediction="flow", sample_shape=(2,),
                        name=name)


def score(adapter, cfg: CouplingBenchConfig) -> dict:
    """Straightness and W2 per NFE on the held-out noises."""
    from eval.metrics import flow_straightness, wasserstein
    from schedules.embedded.nets import toy2d_data
    from schedules.solvers import sample

    noise, real = adapter.noise(cfg.eval_samples, EVAL_SEED), toy2d_data(cfg.eval_samples, seed=EVAL_SEED + 1)
    with torch.no_grad():
        row = {"straightness": flow_straightness(adapter, noise[:500])}
        for k in cfg.nfe:
            x = sample(adapter, noise, torch.linspace(1.0, 0.0, k + 1, dtype=torch.float64).tolist(), "euler")
            row[f"w2_nfe{k}"] = wasserstein(x, real)
    return row


def run_coupling_bench(cfg: CouplingBenchConfig, out: Path | None = None, command: str | None = None) -> dict:
    from schedules.embedded.train import train
    from schedules.io import atomic_write_json

    result = {"command": command, "config": {**asdict(cfg), "threads": torch.get_num_threads()}, "rows": []}
    for kind in cfg.couplings:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            res = train("toy2d-flow", cfg.steps, cfg.seed, cfg.batch_size, cfg.lr, Path(work), cfg.steps + 1,
                        coupling=kind, ot_batch=cfg.ot_batch if kind != "independent" else None)
        row = {"coupling": kind, "train_seconds": round(time.perf_counter() - t0, 1),
               "final_loss": res["info"]["final_loss"], **score(_adapter(res["model"], f"toy2d-{kind}"), cfg)}
        result["rows"].append(row)
        print(row, file=sys.stderr, flush=True)
        if out is not None:
            atomic_write_json(out, result)
    return result


def markdown(result: dict) -> str:
    nfes = result["config"]["nfe"]
    lines = ["| coupling | straightness | " + " | ".join(f"W2 NFE {k}" for k in nfes) + " | train s |",
             "|---|---|" + "---|" * len(nfes) + "---|"]
    for r in result["rows"]:
        lines.append(f"| {r['coupling']} | {r['straightness']:.4g} | "
                     + " | ".join(f"{r[f'w2_nfe{k}']:.4g}" for k in nfes) + f" | {r['train_seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.couplings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, CouplingBenchConfig)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="result JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = config_from_args(CouplingBenchConfig, a)
    result = run_coupling_bench(cfg, a.out, shlex.join(["python", "-m", "benchmarks.couplings", *argv]))
    print(markdown(result))


if __name__ == "__main__":
    main()
