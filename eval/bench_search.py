"""Benchmark of schedule search: every method and baseline side by side (a script, not a test).

    python eval/bench_search.py [--configs toy2d-flow:euler,digits-flow:euler,digits-ddpm:ddim,digits-ddpm:dpmpp-2m]
                                [--nfe 4,6,8,10] [--samples 32] [--eval-n 512] [--out bench_search.json]

Protocol
* Search samples come from noise seed 0 (``make_table`` default); evaluation uses held-out noise
  seed 10 000 (``--eval-n`` samples) and never the search seed.
* Teacher = ``schedules.solvers.reference_sample`` (Heun, 200 steps) on the evaluation noises.
* toy2d-flow: exact W2 (POT) to fresh true moons samples (same N) and teacher distance.
* digits models: teacher distance (MSE to the teacher's sample from the same noise) and FID on the
  128-d digits-features network (``eval.metrics.fid``) of the N samples vs all 1,797 real digits.
  FID is biased at this N: compare rows only with each other.
* Search cost: model calls (batched network evaluations), seconds, and for ``dp`` the
  cost-accumulation seconds ÷ reference-pass seconds (``dp/ref``) plus total search seconds ÷
  reference-pass seconds.
* "direct": a long evolutionary search whose fitness *is* the evaluation metric (toy2d: W2 of 1,024
  samples from search seed 1 against true samples of another seed; it never sees the eval seeds) —
  the gain it finds over the best baseline is the yardstick for flow models.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schedules import load_model  # noqa: E402
from schedules.baselines import BASELINES  # noqa: E402
from schedules.io import StepsmithError, atomic_write_json  # noqa: E402
from schedules.search import make_table  # noqa: E402
from schedules.solvers import reference_sample, sample  # noqa: E402

EVAL_SEED = 10_000


def searched_options(solver: str, model: str, samples: int, grid: int | None = None,
                     teacher_steps: int = 200) -> dict[str, dict]:
    small = model != "builtin:toy2d-flow"
    grid = grid or (60 if small else 100)
    return {
        "dp": dict(samples=samples, grid=grid),
        "dp-teacher": dict(samples=samples, grid=grid, mode="teacher"),
        "evolution": dict(samples=samples, grid=grid, population=16, generations=8),
        "ays": dict(samples=samples, draws=1, candidates=9, max_sweeps=3, teacher_steps=min(teacher_steps, 100)),
    }


class Evaluator:
    def __init__(self, model: str, n: int, teacher_steps: int = 200):
        self.ad = load_model(model)
        self.name = model
        self.noise = self.ad.noise(n, EVAL_SEED)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.teacher = torch.cat([reference_sample(self.ad, self.noise[i:i + 256], teacher_steps)
                                      for i in range(0, n, 256)])
        self.teacher_seconds = time.perf_counter() - t0
        if model == "builtin:toy2d-flow":
            from schedules.embedded.nets import toy2d_data

            self.real = toy2d_data(n, seed=4242)
            self.net = None
        else:
            from eval.features import load_feature_network
            from schedules.embedded.nets import digits_data

            self.real = digits_data()[0]
            self.net = load_feature_network("digits-features")
        self.teacher_metric = self.metric(self.teacher)

    def metric(self, x: torch.Tensor) -> float:
        if self.net is None:
            from eval.metrics import wasserstein

            return wasserstein(x, self.real)
        from eval.metrics import fid

        with torch.no_grad():
            return fid(self.real, x.clamp(-1, 1), self.net)

    def __call__(self, sigmas, solver):
        with torch.no_grad():
            x = torch.cat([sample(self.ad, self.noise[i:i + 256], sigmas, solver) for i in range(0, len(self.noise), 256)])
        return {"teacher_mse": float(((x.double() - self.teacher.double()) ** 2).mean()), "metric": self.metric(x)}


def direct_w2_table(ad, nfe: int, solver: str, n: int = 1024, population: int = 32, generations: int = 20):
    """Long evolutionary search with W2 (search seed 1 vs true samples of seed 777) as fitness."""
    from eval.metrics import wasserstein
    from schedules.embedded.nets import toy2d_data

    noise = ad.noise(n, 1)
    real = toy2d_data(n, seed=777)

    def fit(sig):
        with torch.no_grad():
            return wasserstein(sample(ad, noise, sig, solver), real)

    return make_table(ad, "evolution", nfe, solver, grid=100, population=population, generations=generations,
                      fitness=fit, seed=1)


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="toy2d-flow:euler,digits-flow:euler,digits-ddpm:ddim,digits-ddpm:dpmpp-2m")
    p.add_argument("--nfe", default="4,6,8,10")
    p.add_argument("--samples", type=int, default=32, help="search samples B")
    p.add_argument("--eval-n", type=int, default=512)
    p.add_argument("--methods", default="dp,dp-teacher,evolution,ays")
    p.add_argument("--no-direct", action="store_true")
    p.add_argument("--direct", default="1024,32,20", help="direct search: samples,population,generations")
    p.add_argument("--grid", type=int, default=None, help="grid for dp/evolution (default 100 toy2d, 60 digits)")
    p.add_argument("--teacher-steps", type=int, default=200, help="Heun steps of the evaluation teacher")
    p.add_argument("--out", default="bench_search.json")
    args = p.parse_args()
    nfes = [int(v) for v in args.nfe.split(",")]
    results: list[dict] = []
    evaluators: dict[str, Evaluator] = {}
    for cfg in args.configs.split(","):
        model_key, solver = cfg.split(":")
        model = f"builtin:{model_key}"
        if model not in evaluators:
            evaluators[model] = Evaluator(model, args.eval_n, args.teacher_steps)
            print(f"# {model}: teacher (heun {args.teacher_steps}) metric {evaluators[model].teacher_metric:.4f} "
                  f"({evaluators[model].teacher_seconds:.0f}s)", flush=True)
        ev = evaluators[model]
        ad = ev.ad
        opts = searched_options(solver, model, args.samples, args.grid, args.teacher_steps)
        for nfe in nfes:
            rows = []
            for name in BASELINES:
                try:
                    t = make_table(ad, name, nfe, solver)
                except StepsmithError:
                    continue
                rows.append({"method": name, "kind": "baseline", "sigmas": t.sigmas, **ev(t.sigmas, solver)})
            for name in args.methods.split(","):
                method = "dp" if name.startswith("dp") else name
                calls0 = ad.calls
                t0 = time.perf_counter()
                t = make_table(ad, method, nfe, solver, **opts[name])
                secs = time.perf_counter() - t0
                pv = t.provenance
                ref_s = pv.get("reference_seconds")
                rows.append({"method": name, "kind": "searched", "sigmas": t.sigmas, **ev(t.sigmas, solver),
                             "calls": ad.calls - calls0, "seconds": round(secs, 1),
                             "dp_over_ref": pv.get("dp_over_reference"),
                             "search_over_ref": round(secs / ref_s, 2) if ref_s else None,
                             "timesteps": t.timesteps})
            if model == "builtin:toy2d-flow" and not args.no_direct:
                t0 = time.perf_counter()
                dn, dpop, dgen = (int(v) for v in args.direct.split(","))
                t = direct_w2_table(ad, nfe, solver, dn, dpop, dgen)
                rows.append({"method": "direct-w2", "kind": "direct", "sigmas": t.sigmas, **ev(t.sigmas, solver),
                             "seconds": round(time.perf_counter() - t0, 1)})
            for r in rows:
                r.update(model=model, solver=solver, nfe=nfe)
            results.extend(rows)
            atomic_write_json(args.out, {"eval_seed": EVAL_SEED, "eval_n": args.eval_n, "samples": args.samples,
                                         "results": results})
            summarize(rows, model, solver, nfe, ev.teacher_metric)
    print_tables(results)


def summarize(rows, model, solver, nfe, teacher_metric):
    mname = "W2" if model.endswith("toy2d-flow") else "FID"
    print(f"\n## {model} {solver} NFE {nfe}   (teacher {mname} {teacher_metric:.4f})", flush=True)
    for r in rows:
        extra = ""
        if r["kind"] == "searched":
            extra = f"  calls {r['calls']:>6}  {r['seconds']:>6.1f}s  dp/ref {r['dp_over_ref']}  search/ref {r['search_over_ref']}"
        print(f"  {r['method']:<14} teacher-mse {r['teacher_mse']:.5f}  {mname} {r['metric']:.4f}{extra}", flush=True)


def pct(new: float, old: float) -> str:
    return f"{100 * (new - old) / old:+.1f}%" if old else "n/a"


def print_tables(results):
    by = {}
    for r in results:
        by.setdefault((r["model"], r["solver"]), []).append(r)
    print(f"\n\n# Summary (held-out seed {EVAL_SEED})")
    for (model, solver), rows in by.items():
        mname = "W2" if model.endswith("toy2d-flow") else "FID"
        nfes = sorted({r["nfe"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for key, label in (("teacher_mse", "teacher MSE"), ("metric", mname)):
            print(f"\n{model} / {solver} — {label}")
            print(f"  {'method':<14}" + "".join(f"{'NFE ' + str(n):>12}" for n in nfes))
            for m in methods:
                vals = {r["nfe"]: r[key] for r in rows if r["method"] == m}
                print(f"  {m:<14}" + "".join(f"{vals.get(n, math.nan):>12.5g}" for n in nfes))
            for n in nfes:
                rn = [r for r in rows if r["nfe"] == n]
                bb = min((r for r in rn if r["kind"] == "baseline"), key=lambda r: r[key])
                bs = min((r for r in rn if r["kind"] == "searched"), key=lambda r: r[key])
                dflt = next(r for r in rn if r["method"] == "default")
                dp = next((r for r in rn if r["method"] == "dp"), None)
                line = (f"  NFE {n}: best baseline {bb['method']} {bb[key]:.5g}; best searched {bs['method']} "
                        f"{bs[key]:.5g} ({pct(bs[key], bb[key])} vs best baseline)")
                if dp is not None:
                    line += f"; dp vs default {pct(dp[key], dflt[key])}"
                direct = next((r for r in rn if r["kind"] == "direct"), None)
                if direct is not None:
                    gain_direct = bb[key] - direct[key]
                    gain = bb[key] - bs[key]
                    line += (f"; direct {direct[key]:.5g}, searched/direct gain "
                             f"{(gain / gain_direct if gain_direct > 0 else math.nan):.2f}")
                print(line)


if __name__ == "__main__":
    main()
