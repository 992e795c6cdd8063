"""Measure the FID floor of the embedded digits models under ``digits-features``.

For each model: FID against one half of the real digits of (a) the reference sampler
(Heun, ``--steps`` steps) from N held-out noises, (b) pure noise, (c) the other half of the
real digits — all at equal N (N = half the data set, 898). Prints and writes JSON.

    python -m benchmarks.measure_embedded --out runs/measure_embedded.json [--steps 200]

``benchmarks/results/measure_embedded_20steps.json`` is the committed run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch


def measure(name: str, steps: int, seed: int, batch_size: int) -> dict:
    """FID and KID of the reference sampler, of pure noise and of real digits, against the same real half."""
    from eval.features import load_feature_network
    from eval.metrics import extract_features, fid_from_features, kid_from_features
    from eval.sweep import reference_batched
    from schedules.adapters import load_model
    from schedules.embedded.nets import digits_data

    x, _ = digits_data()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n = x.shape[0] // 2
    real_a, real_b = x[perm[:n]], x[perm[n:2 * n]]
    net = load_feature_network("digits-features")
    f_b = extract_features(net, real_b)
    model = load_model(f"builtin:{name}")
    noise = model.noise(n, seed)
    t0 = time.perf_counter()
    ref = reference_batched(model, noise, steps, batch_size)
    seconds = time.perf_counter() - t0
    out = {"model": f"builtin:{name}", "n": n, "eval_seed": seed, "teacher": f"Heun {steps} steps ({2 * steps - 1} NFE)",
           "teacher_seconds": round(seconds, 1), "teacher_out_of_range_frac": float((ref.abs() > 1).float().mean())}
    for label, imgs in (("teacher", ref.clamp(-1, 1)), ("noise", noise.clamp(-1, 1)), ("real_half", real_a)):
        f = extract_features(net, imgs)
        out[f"fid_{label}"] = fid_from_features(f_b, f)
        out[f"kid_{label}"] = kid_from_features(f_b, f, subsets=50, subset_size=n, seed=seed)[0]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measure_embedded", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-flow,digits-ddpm")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=449)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = [measure(m, a.steps, a.seed, a.batch_size) for m in a.models.split(",")]
    command = shlex.join(["python", "-m", "benchmarks.measure_embedded", *argv])
    text = json.dumps({"command": command, "threads": a.threads, "results": results}, indent=2)
    print(text)
    if a.out:
        from schedules.io import atomic_write

        atomic_write(a.out, text + "\n")


if __name__ == "__main__":
    main()
