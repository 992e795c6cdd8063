"""NFE sweeps: score many tables (methods × NFE) on the same held-out noises.

:func:`run_sweep` is the Python entry point behind ``stepsmith eval``::

    from eval.sweep import run_sweep
    report = run_sweep("builtin:digits-flow", methods=["uniform", "karras", "dp"], nfe=[4, 6, 8],
                       num=1000, out="runs/eval")
    report["results"][0]["value"]   # FID of the first (method, NFE) cell

Protocol
--------
* Every cell samples the same ``num`` noises, ``adapter.noise(num, seed)`` with the
  evaluation seed (default 10 000). Tables searched on a seed equal to the evaluation seed
  are refused: search and evaluation samples never overlap. The report records both.
* The teacher is the reference sampler (Heun on a fine grid) from the same noises: its
  score is the floor of the plot, and every cell also gets its coupled-noise MSE / PSNR to
  the teacher's samples.
* Image models are scored by FID (or KID) under a feature network against real data whose
  statistics are cached on disk; low-dimensional models by the exact Wasserstein distance
  (plus MMD and energy distance) against true samples.

Scale-out: under ``accelerate launch`` (or any initialised torch.distributed group) each
process samples and featurises a contiguous slice of the noises; FID statistics are summed
across processes by torchmetrics, other quantities are gathered. Results equal the
single-process run up to float summation order.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eval.metrics import (
    FeatureStats,
    FewSamplesWarning,
    check_samples,
    extract_features,
    fid_from_metric,
    fid_metric,
    kid_from_features,
    lowdim_metrics,
    set_real_stats,
)
from schedules.io import StepsmithError
from schedules.table import TimestepTable, load_table

METRICS = ("fid", "kid", "wasserstein", "teacher")
DEFAULT_EVAL_SEED = 10_000
REPORT_FORMAT = "stepsmith.eval/v1"


# --------------------------------------------------------------------------- distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """Contiguous slice of ``n`` items for this process (rank 0 gets the first ones)."""
        per = math.ceil(n / self.world)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        objs: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(objs, t.cpu())
        return torch.cat([o for o in objs if o.numel()] or [t.cpu()])

    def sum(self, v: float) -> float:
        if self.world == 1:
            return v
        objs: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(objs, float(v))
        return float(sum(objs))

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def current_dist() -> Dist:
    """The torch.distributed layout; starts accelerate's process group under ``accelerate launch``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()):
        from accelerate import PartialState

        PartialState(cpu=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Dist()


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (table, label) to score."""

    label: str
    table: TimestepTable
    source: str  # "method" | path of a table file
    make_seconds: float = 0.0
    search_seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def search_seeds(table: TimestepTable) -> set[int]:
    """Seeds whose noises a table's search used (``provenance['seed']`` / ``['seeds']``)."""
    prov = table.provenance or {}
    out: set[int] = set()
    if isinstance(prov.get("seed"), int):
        out.add(int(prov["seed"]))
    if isinstance(prov.get("seeds"), list):
        out.update(int(s) for s in prov["seeds"] if isinstance(s, int))
    return out


def _make_table_fn():
    try:
        from schedules.search import make_table

        return make_table
    except ImportError:
        from schedules.baselines import BASELINES

        def fallback(adapter, method, nfe, solver="euler", **_):
            if method not in BASELINES:
                raise StepsmithError(f"unknown method {method!r}; available here: {', '.join(BASELINES)}")
            return BASELINES[method](adapter, nfe, solver)

        return fallback


def build_cells(adapter, *, tables=None, methods=None, nfe=(2, 4, 6, 8, 10), solver="euler", search_seed=0,
                search_samples=None, search_options=None, progress=False) -> list[Cell]:
    cells: list[Cell] = []
    if tables:
        for t in tables:
            table = t if isinstance(t, TimestepTable) else load_table(t)
            table.check_compatible(adapter.convention, adapter.prediction, what=adapter.name)
            src = "table" if isinstance(t, TimestepTable) else str(t)
            seeds = sorted(search_seeds(table))
            cells.append(Cell(table.method, table, src, float(table.provenance.get("seconds") or 0.0),
                              seeds[0] if seeds else None))
    if methods:
        make = _make_table_fn()
        opts = dict(search_options or {})
        for method in methods:
            for n in nfe:
                t0 = time.perf_counter()
                kwargs = {"seed": search_seed, "progress": progress, **opts}
                if search_samples is not None:
                    kwargs["samples"] = search_samples
                table = make(adapter, method, int(n), solver, **kwargs)
                seeds = sorted(search_seeds(table))
                cells.append(Cell(method, table, "method", time.perf_counter() - t0, seeds[0] if seeds else None))
    if not cells:
        raise StepsmithError("nothing to evaluate: give tables (--tables T.json ...) or methods (--methods uniform,dp)")
    # unique labels for (label, nfe)
    seen: dict[tuple[str, int], int] = {}
    for c in cells:
        k = (c.label, int(c.table.nfe))
        seen[k] = seen.get(k, 0) + 1
        if seen[k] > 1:
            c.label = f"{c.label}#{seen[k]}" if c.source in ("method", "table") else Path(c.source).stem
    return cells


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_batched(adapter, noise: torch.Tensor, sigmas, solver: str, batch_size: int, on_batch=None) -> torch.Tensor:
    from schedules.solvers import sample

    out = []
    for i in range(0, noise.shape[0], batch_size):
        out.append(sample(adapter, noise[i:i + batch_size], sigmas, solver).detach().cpu())
        if on_batch is not None:
            on_batch()
    return torch.cat(out) if out else noise[:0].cpu()


@torch.no_grad()
def reference_batched(adapter, noise: torch.Tensor, steps: int, batch_size: int, on_batch=None) -> torch.Tensor:
    from schedules.solvers import reference_sigmas

    return sample_batched(adapter, noise, reference_sigmas(adapter.convention, steps), "heun", batch_size, on_batch)


# --------------------------------------------------------------------------- scorer


class Scorer:
    """Scores a shard of samples with the sweep's metric; collective calls on every rank."""

    def __init__(self, metric: str, dist: Dist, *, real: torch.Tensor | None, net=None, real_stats: FeatureStats | None,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0):
        self.metric, self.dist, self.net, self.seed = metric, dist, net, seed
        self.real = real
        self.real_stats = real_stats
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        if metric == "fid":
            self.fid = fid_metric(net.num_features)
            # real sums live on rank 0 only: torchmetrics sums every state across processes
            set_real_stats(self.fid, real_stats if dist.main else None)

    def score(self, x_shard: torch.Tensor, n_total: int) -> tuple[float, dict[str, float]]:
        """(main value, extra values) of the gathered samples."""
        if self.metric == "fid":
            f = extract_features(self.net, x_shard) if x_shard.shape[0] else torch.zeros(0, self.net.num_features,
                                                                                            dtype=torch.float64)
            self.fid.reset()
            if f.shape[0]:
                self.fid.update(f, real=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torchmetrics' compute-before-update on empty shards
                v = fid_from_metric(self.fid)
            extra: dict[str, float] = {}
            # KID from the same features at no extra sampling cost (unbiased, so it reads well at small N)
            f_all = self.dist.gather_cat(f)
            real_f = self.real_stats.features if self.real_stats is not None else None
            if real_f is not None and f_all.shape[0] >= 2 and real_f.shape[0] >= 2:
                size = min(self.kid_subset_size, f_all.shape[0], real_f.shape[0])
                extra["kid"], extra["kid_std"] = kid_from_features(real_f, f_all, subsets=self.kid_subsets,
                                                                   subset_size=size, seed=self.seed)
            return v, extra
        if self.metric == "kid":
            f = extract_features(self.net, x_shard) if x_shard.shape[0] else torch.zeros(0, self.net.num_features,
                                                                                            dtype=torch.float64)
            f = self.dist.gather_cat(f)
            mean, std = kid_from_features(self.real_stats.features, f, subsets=self.kid_subsets,
                                          subset_size=self.kid_subset_size, seed=self.seed)
            return mean, {"kid_std": std}
        if self.metric == "wasserstein":
            x = self.dist.gather_cat(x_shard)
            m = lowdim_metrics(x, self.real)
            return m["wasserstein"], {"mmd": m["mmd"], "energy": m["energy"]}
        raise StepsmithError(f"metric {self.metric!r} has no real-data score")


def _fidelity(dist: Dist, x: torch.Tensor, ref: torch.Tensor, n_total: int, data_range: float) -> dict[str, float]:
    se = float((x.to(torch.float64) - ref.to(torch.float64)).pow(2).sum()) if x.shape[0] else 0.0
    se = dist.sum(se)
    numel = n_total * (x[0].numel() if x.shape[0] else ref[0].numel() if ref.shape[0] else 1)
    mse = se / numel
    psnr = math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
    return {"mse": mse, "rmse": math.sqrt(mse), "psnr": psnr}


# --------------------------------------------------------------------------- main entry


def resolve_metric(adapter, metric: str | None) -> str:
    if metric is None:
        return "wasserstein" if len(adapter.sample_shape) == 1 else "fid"
    if metric not in METRICS:
        raise StepsmithError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric in ("fid", "kid") and len(adapter.sample_shape) != 3:
        raise StepsmithError(f"{metric} scores images [C, H, W]; {adapter.name} makes samples of shape "
                             f"{list(adapter.sample_shape)} — use --metric wasserstein or teacher")
    if metric == "wasserstein" and len(adapter.sample_shape) != 1:
        raise StepsmithError("the exact Wasserstein distance is for low-dimensional vectors; use fid, kid or teacher "
                             "for images")
    return metric


def run_sweep(model, *, tables=None, methods=None, nfe=(2, 4, 6, 8, 10), solver: str = "euler", num: int = 1000,
              metric: str | None = None, out: str | os.PathLike | None = None, seed: int = DEFAULT_EVAL_SEED,
              real: torch.Tensor | str | os.PathLike | None = None, real_seed: int | None = None,
              features=None, inception_weights=None, teacher: bool = True, teacher_steps: int = 50,
              batch_size: int = 500, grid: int = 64, cache: str | os.PathLike | None = None, use_cache: bool = True,
              search_seed: int = 0, search_samples: int | None = None, search_options: dict | None = None,
              kid_subsets: int = 100, kid_subset_size: int = 1000, data_range: float = 2.0,
              progress: bool = True, command: str | None = None, sampler=None) -> dict[str, Any]:
    """Score tables or methods across NFE; returns the report dict (and writes it to ``out``).

    ``model``: a spec (``builtin:digits-flow``...) or a :class:`~schedules.adapters.ModelAdapter`.
    ``tables``: table files or :class:`TimestepTable` objects; ``methods``: names for
    ``schedules.search.make_table`` evaluated at every ``nfe`` with ``solver``.
    ``metric``: fid | kid | wasserstein | teacher (default: fid for images, wasserstein for
    vectors). ``real``: real samples (tensor or path; default: the embedded model's data).
    ``features``: feature network name or nn.Module (default digits-features for 16x16
    digits, else inception, which needs local weights).
    ``sampler``: optional ``sampler(table, noise) -> samples`` used instead of
    :func:`schedules.solvers.sample` for the table rows (e.g. a diffusers pipeline driven by
    the table); the teacher always uses the built-in reference sampler.
    """
    from schedules.adapters import ModelAdapter, load_model

    t_start = time.perf_counter()
    dist = current_dist()
    adapter = model if isinstance(model, ModelAdapter) else load_model(str(model))
    metric = resolve_metric(adapter, metric)
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise StepsmithError(f"--num must be an integer of at least 2, got {num!r}")
    if metric == "teacher" and not teacher:
        raise StepsmithError("--metric teacher needs the reference sampler; drop --no-teacher")
    nfe = [int(n) for n in nfe]
    if methods and (not nfe or any(n < 1 for n in nfe)):
        raise StepsmithError(f"--nfe must list positive integers, got {nfe}")
    caught: list[str] = []

    # ---- tables (made once, on the main process)
    cells: list[Cell] | None = None
    error: str | None = None
    if dist.main:
        try:
            cells = build_cells(adapter, tables=tables, methods=methods, nfe=nfe, solver=solver, search_seed=search_seed,
                                search_samples=search_samples, search_options=search_options)
        except StepsmithError as exc:
            error = str(exc)
    cells, error = dist.broadcast((cells, error))
    if error:
        raise StepsmithError(error)
    used_search_seeds = sorted({s for c in cells for s in search_seeds(c.table)})
    if seed in used_search_seeds:
        raise StepsmithError(
            f"evaluation seed {seed} was used to search a table (search seeds {used_search_seeds}); evaluate on "
            f"held-out noises: pass another --seed (default {DEFAULT_EVAL_SEED})"
        )

    # ---- real data and the scorer
    real_info: dict[str, Any] = {}
    real_x: torch.Tensor | None = None
    net = None
    stats = None
    if metric != "teacher":
        if real is None:
            rs = seed + 1 if real_seed is None else real_seed
            real_x, desc = default_real(adapter, num, rs)
            real_info["source"] = desc
        elif isinstance(real, torch.Tensor):
            real_x = check_samples(real, "real data")
            real_info["source"] = "tensor"
        else:
            from eval.data import load_real_data

            real_x = load_real_data(real, adapter.sample_shape)
            real_info["source"] = str(real)
        if tuple(real_x.shape[1:]) != tuple(adapter.sample_shape):
            raise StepsmithError(f"real data have samples of shape {list(real_x.shape[1:])} but {adapter.name} makes "
                                 f"{list(adapter.sample_shape)}; give real data of the model's size and channels")
        from eval.data import tensor_hash

        real_info.update(n=int(real_x.shape[0]), sha256=tensor_hash(real_x))
        if metric in ("fid", "kid"):
            from eval.data import real_feature_stats
            from eval.features import load_feature_network

            if features is None:
                features = "digits-features" if tuple(adapter.sample_shape) == (1, 16, 16) else "inception"
            net = load_feature_network(features, inception_weights=inception_weights)
            net.probe(real_x[:2])
            if dist.main:
                stats, cinfo = real_feature_stats(real_x, net, cache=cache, use_cache=use_cache)
                dist.barrier()
            else:
                dist.barrier()  # let the main process write the cache entry first
                stats, cinfo = real_feature_stats(real_x, net, cache=cache, use_cache=use_cache)
            real_info["stats_cache"] = cinfo
            real_info["feature_network"] = {"name": net.name, "num_features": net.num_features,
                                            "weights_sha256": net.weights_hash()}
            if num < net.num_features or stats.n < net.num_features:
                msg = (f"N={num} generated / {stats.n} real samples < {net.num_features} feature dimensions: FID is "
                       "singular and strongly biased; compare only at equal N")
                caught.append(msg)
                warnings.warn(msg, FewSamplesWarning, stacklevel=2)
        if metric == "kid":
            kid_subset_size = min(kid_subset_size, num, stats.n)
    scorer = (Scorer(metric, dist, real=real_x, net=net, real_stats=stats, kid_subsets=kid_subsets,
                     kid_subset_size=kid_subset_size, seed=seed) if metric != "teacher" else None)

    # ---- noises: the same for every cell; this process takes a contiguous slice
    noise_all = adapter.noise(num, seed)
    shard = dist.shard(num)
    noise = noise_all[shard]
    n_batches = math.ceil(max(noise.shape[0], 1) / batch_size)
    from tqdm.auto import tqdm

    total = sum(c.table.nfe for c in cells) * n_batches + (2 * teacher_steps - 1) * n_batches * int(teacher)
    bar = tqdm(total=total, desc="eval sweep", unit="NFE·batch", disable=not (progress and dist.main), file=sys.stderr)
    out_dir = Path(out) if out is not None else None
    grids_dir = out_dir / "grids" if out_dir is not None else None

    def draw(x: torch.Tensor, name: str, title: str) -> str | None:
        if grids_dir is None or not dist.main or grid <= 0 or x.shape[0] == 0:
            return None
        from schedules.viz import save_samples

        ref = real_x[:2000] if (real_x is not None and len(adapter.sample_shape) == 1) else None
        p = save_samples(x[:grid], grids_dir / f"{name}.png", title=title, reference=ref)
        return str(p.relative_to(out_dir))

    # ---- teacher
    teacher_row: dict[str, Any] | None = None
    ref_x: torch.Tensor | None = None
    if teacher:
        calls0 = adapter.calls
        bar.set_postfix_str(f"teacher ({teacher_steps} Heun steps)")
        t0 = time.perf_counter()
        ref_x = reference_batched(adapter, noise, teacher_steps, batch_size,
                                  lambda: bar.update(2 * teacher_steps - 1))
        check_samples(ref_x, "reference samples", min_n=1) if ref_x.shape[0] else None
        t_sample = time.perf_counter() - t0
        teacher_row = {"label": "teacher", "solver": "heun", "steps": teacher_steps, "nfe": 2 * teacher_steps - 1,
                       "n": num, "model_calls": dist.sum(adapter.calls - calls0)}
        t0 = time.perf_counter()
        if scorer is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewSamplesWarning)
                v, extra = scorer.score(ref_x, num)
            teacher_row.update(value=v, extra=extra)
        else:
            teacher_row.update(value=0.0, extra={})
        teacher_row["timings"] = {"sample_seconds": round(t_sample, 3), "metric_seconds": round(time.perf_counter() - t0, 3)}
        teacher_row["grid"] = draw(ref_x, "teacher", f"{adapter.name}: teacher (Heun {teacher_steps} steps)")

    # ---- cells
    rows: list[dict[str, Any]] = []
    for c in cells:
        t = c.table
        bar.set_postfix_str(f"{c.label} NFE {t.nfe}")
        calls0 = adapter.calls
        t0 = time.perf_counter()
        if sampler is None:
            x = sample_batched(adapter, noise, t.sigmas, t.solver, batch_size, lambda c=c: bar.update(c.table.nfe))
        else:
            x = torch.cat([sampler(t, noise[i:i + batch_size]).detach().cpu() for i in range(0, noise.shape[0], batch_size)]
                          or [noise[:0].cpu()])
            bar.update(t.nfe * n_batches)
            if tuple(x.shape) != tuple(noise.shape):
                raise StepsmithError(f"sampler returned {list(x.shape)} for noise {list(noise.shape)}; it must return "
                                     "one sample per noise, of the model's shape")
        if x.shape[0]:
            check_samples(x, f"samples of {c.label} at NFE {t.nfe}", min_n=1)
        t_sample = time.perf_counter() - t0
        row: dict[str, Any] = {
            "label": c.label, "method": t.method, "nfe": int(t.nfe), "steps": int(t.steps), "solver": t.solver,
            "sigmas": t.sigmas, "timesteps": t.timesteps, "source": c.source, "search_seed": c.search_seed,
            "search_provenance": t.provenance, "n": num, "model_calls": dist.sum(adapter.calls - calls0),
        }
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if teacher:
            fidel = _fidelity(dist, x, ref_x, num, data_range)
            extra["teacher_mse"], extra["teacher_psnr"] = fidel["mse"], fidel["psnr"]
        if scorer is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewSamplesWarning)
                value, more = scorer.score(x, num)
            extra.update(more)
        else:
            value = extra["teacher_mse"]
        row.update(value=value, extra=extra)
        row["timings"] = {"table_seconds": round(c.make_seconds, 3), "sample_seconds": round(t_sample, 3),
                          "metric_seconds": round(time.perf_counter() - t0, 3)}
        row["grid"] = draw(x, f"{_safe(c.label)}_nfe{t.nfe}", f"{adapter.name}: {c.label} {t.solver} NFE {t.nfe}")
        rows.append(row)
    bar.close()

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "model": adapter.name,
        "model_info": adapter.describe(),
        "metric": metric,
        "lower_is_better": True,
        "num": num,
        "eval_seed": seed,
        "eval_noise": f"adapter.noise({num}, seed={seed}) — the same noises for every row",
        "search_seeds": used_search_seeds,
        "seeds_disjoint": seed not in used_search_seeds,
        "solver": solver if methods else sorted({c.table.solver for c in cells}),
        "nfe": sorted({int(c.table.nfe) for c in cells}),
        "methods": list(dict.fromkeys(c.label for c in cells)),
        "real": real_info,
        "teacher": teacher_row,
        "results": rows,
        "processes": dist.world,
        "batch_size": batch_size,
        "warnings": caught,
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "command": command,
        "versions": _versions(),
    }
    if out_dir is not None and dist.main:
        from eval.report import write_report

        write_report(report, out_dir)
    dist.barrier()
    return report


def default_real(adapter, n: int, seed: int) -> tuple[torch.Tensor, str]:
    from eval.data import default_real_data

    return default_real_data(adapter.name, n, seed)


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _versions() -> dict[str, str]:
    import torchmetrics

    from schedules.table import package_version

    return {"stepsmith": package_version(), "torch": torch.__version__, "torchmetrics": torchmetrics.__version__}
