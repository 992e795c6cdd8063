"""What a search checkpoint (dp or ays) costs and saves: one search run three ways, side by side in one process.

1. the search without a checkpoint;
2. the same search writing its checkpoint (``checkpoint=PATH``): the cost of saving;
3. the same search killed at ``kill_at`` of the first run's model calls, then started again with the same
   checkpoint: the calls the resumed run spends (what was left, plus one rollout to rebuild the refined path's
   node states), and whether it ends on the first run's table::

    python -m benchmarks.resume --model builtin:digits-ddpm --solver ddim --nfe 8
    python -m benchmarks.resume --method ays --options '{"draws": 1, "candidates": 9, "max_sweeps": 3, "teacher_steps": 50}'

After an untimed warm-up search (2 samples, no refinement: imports and first calls), prints one JSON line with
each run's calls and seconds and the ratios; single-threaded unless ``--threads``; exit 1 if a table differs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from benchmarks.options import add_config_args, config_from_args


@dataclass(frozen=True)
class ResumeConfig:
    """The search to measure (the bench's dp options by default) and where the kill lands."""

    method: str = field(default="dp", metadata={"help": "dp or ays"})
    model: str = "builtin:digits-ddpm"
    solver: str = "ddim"
    nfe: int = 8
    samples: int = 32
    seed: int = 0
    options: dict = field(default_factory=lambda: {"grid": 60, "candidates": 6, "max_sweeps": 2},
                          metadata={"help": "dp options as JSON"})
    kill_at: float = field(default=0.6, metadata={"help": "fraction of the first run's model calls"})
    threads: int = 1


class Killed(Exception):
    """The simulated kill of the search process."""


def killed_after(adapter, calls: int):
    """``adapter`` whose network raises :class:`Killed` once its call counter reaches ``calls`` (a process killed
    mid-search)."""
    network = adapter.network

    def killed(x, t):
        if adapter.calls >= calls:
            raise Killed
        return network(x, t)

    adapter.network = killed
    return adapter


def _search(cfg: ResumeConfig, checkpoint: str | None = None, kill_after: int | None = None):
    from schedules.adapters import load_model
    from schedules.search import make_table

    adapter = load_model(cfg.model)
    if kill_after is not None:
        killed_after(adapter, kill_after)
    t0 = time.perf_counter()
    try:
        table = make_table(adapter, cfg.method, cfg.nfe, cfg.solver, samples=cfg.samples, seed=cfg.seed,
                           checkpoint=checkpoint, **cfg.options)
    except Killed:
        table = None
    return table, adapter.calls, round(time.perf_counter() - t0, 2)


def run(cfg: ResumeConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    out: dict = {"config": asdict(cfg)}
    _search(ResumeConfig(**{**asdict(cfg), "samples": 2, "options": {**cfg.options, "max_sweeps": 0}}))  # warm-up
    plain, calls, secs = _search(cfg)
    out["plain"] = {"model_calls": calls, "seconds": secs}
    with tempfile.TemporaryDirectory() as d:
        ck = os.path.join(d, "dp.pt")
        saved, calls, secs = _search(cfg, ck)
        out["with_checkpoint"] = {"model_calls": calls, "seconds": secs, "bytes": os.path.getsize(ck),
                                  "same_table": saved.sigmas == plain.sigmas}
        os.remove(ck)
        _, calls, secs = _search(cfg, ck, kill_after=int(cfg.kill_at * out["plain"]["model_calls"]))
        out["killed"] = {"model_calls": calls, "seconds": secs}
        resumed, calls, secs = _search(cfg, ck)
        out["resumed"] = {"model_calls": calls, "seconds": secs, "table_model_calls": resumed.provenance["model_calls"],
                          "saved_model_calls": resumed.provenance["resumed"]["model_calls"],
                          "same_table": resumed.sigmas == plain.sigmas and resumed.objective == plain.objective}
    out["checkpoint_over_plain_seconds"] = round(out["with_checkpoint"]["seconds"] / out["plain"]["seconds"], 3)
    out["resumed_over_plain_calls"] = round(out["resumed"]["model_calls"] / out["plain"]["model_calls"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resume", description=__doc__.split("\n\n")[0])
    add_config_args(p, ResumeConfig)
    res = run(config_from_args(ResumeConfig, p.parse_args(argv)))
    print(json.dumps(res))
    return 0 if res["resumed"]["same_table"] and res["with_checkpoint"]["same_table"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
