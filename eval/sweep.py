"""NFE sweeps: score many tables (methods × NFE) on the same held-out noises.

:func:`run_sweep` is the Python entry point behind ``stepsmith eval``::

    from eval.sweep import run_sweep
    report = run_sweep("builtin:digits-flow", methods=["uniform", "karras", "dp"], nfe=[4, 6, 8],
                       num=1000, out="runs/eval")
    report["results"][0]["value"]   # FID of the first (method, NFE) cell

The keyword arguments are the fields of :class:`SweepConfig`; ``run_sweep(model, config)`` takes
a ready config. A sweep is a short composition: check the config, prepare the cells (tables), load
the real data and build the scorer, sample the teacher row, score every cell, write the report.

Protocol
--------
* Every cell samples the same ``num`` noises, ``adapter.noise(num, seed)`` with the
  evaluation seed (default 10 000). Tables searched on a seed equal to the evaluation seed
  are refused: search and evaluation samples never overlap. The report records both.
* The teacher is :func:`schedules.teacher.teacher_sample` with ``Teacher("heun", teacher_steps)``
  on the convention's reference grid, from the same noises: its score is the floor of the plot,
  and every cell also gets its coupled-noise MSE / PSNR to the teacher's samples
  (``teacher_mse``, ``teacher_psnr``; see :func:`eval.metrics.teacher_fidelity`).
* Image models are scored by FID (or KID) under a feature network against real data whose
  statistics are cached on disk; low-dimensional models by the exact Wasserstein distance
  (plus MMD and energy distance) against true samples.
* Pipeline models (``adapter.pipeline``, e.g. a saved Stable Diffusion folder): every cell's final
  latents are decoded by the pipeline's VAE (micro-batched) before grids and image metrics (FID/KID
  need ``features`` and ``real`` images; ``clip`` a local CLIP folder); MSE / PSNR to the teacher stay
  on the latents.
* ``guidance`` (a list of scales, conditional models): every (method, NFE) at every scale, on the same
  noises and conditions, with one teacher per scale; searched methods are searched per scale; rows carry
  ``"guidance"``.

Scale-out: under ``accelerate launch`` (or any initialised torch.distributed group) each
process samples and featurises a contiguous slice of the noises; FID statistics are summed
across processes by torchmetrics, other quantities are gathered. Results equal the
single-process run up to float summation order.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from eval.metrics import (
    FeatureStats,
    FewSamplesWarning,
    check_samples,
    extract_features,
    fid_from_features,
    fid_from_metric,
    fid_metric,
    fidelity_from_squared_error,
    kid_from_features,
    lowdim_metrics,
    set_real_stats,
)
from eval.report import staging_folder
from eval.sweep_metrics import (
    KNOWN,
    LEGACY,
    MetricPlan,
    apply_mmhm,
    check_bounds,
    class_accuracy_of,
    inception_score_of,
    lower_is_better,
    manifold_values,
    mmhm_info,
    parse_metrics,
    plan_metrics,
    resolve_metric,
)
from schedules.conditioning import bind, micro_batches
from schedules.distributed import Dist, current_dist  # noqa: F401  (re-exported for older callers)
from schedules.io import StepsmithError, check_output_path
from schedules.table import TimestepTable, load_table
from schedules.teacher import Teacher, teacher_sample

METRICS = LEGACY  # the main metrics of a one-name sweep
ALL_METRICS = KNOWN  # every name `metric` accepts in a comma list (see eval.sweep_metrics)
DEFAULT_EVAL_SEED = 10_000
REPORT_FORMAT = "stepsmith.eval/v1"

Sampler = Callable[[TimestepTable, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- configuration


@dataclass
class SweepConfig:
    """Everything a sweep needs besides the model; the keyword arguments of :func:`run_sweep`.

    ``tables``: table files or :class:`TimestepTable` objects (or ``(label, table)`` pairs); ``methods``: names for
    ``schedules.search.make_table`` evaluated at every ``nfe`` with ``solver``.
    ``metric``: fid | kid | wasserstein | teacher (default: fid for images, wasserstein for
    vectors), or a comma list / sequence of :data:`ALL_METRICS` whose first name is the main one
    and which all land in ``row["metrics"]`` (:mod:`eval.sweep_metrics`). ``bounds``: a frozen
    MMHM bounds file (or :class:`~eval.mmhm.Bounds` / :class:`~eval.mmhm.GroupedBounds`) and
    ``save_bounds``: where to write the bounds used (both need ``mmhm`` in ``metric``).
    ``real``: real samples (tensor or path; default: the embedded model's data, drawn with
    ``real_seed``, default ``seed + 1``). ``features``: feature network name or nn.Module
    (default digits-features for 16x16 digits, else inception, which needs local weights).
    ``teacher``/``teacher_steps``: the Heun reference row (``teacher=False``: none, no PSNR).
    ``sampler``: optional ``sampler(table, noise) -> samples`` used instead of
    :func:`schedules.solvers.sample` for the table rows (e.g. a diffusers pipeline driven by
    the table); the teacher always uses :func:`schedules.teacher.teacher_sample`.
    ``search_samples`` / ``search_options``: samples and keyword options of the searched
    ``methods`` (not given to baselines), e.g. ``{"grid": 60, "candidates": 6}`` for dp.
    ``command``: the command line recorded in the report.
    """

    tables: Sequence[Any] | None = None
    methods: Sequence[str] | None = None
    nfe: Sequence[int] = (2, 4, 6, 8, 10)
    solver: str = "euler"
    num: int = 1000
    metric: str | None = None
    out: str | os.PathLike | None = None
    seed: int = DEFAULT_EVAL_SEED
    real: torch.Tensor | str | os.PathLike | None = None
    real_seed: int | None = None
    features: Any = None
    inception_weights: str | os.PathLike | None = None
    teacher: bool = True
    teacher_steps: int = 50
    batch_size: int = 500
    grid: int = 64
    cache: str | os.PathLike | None = None
    use_cache: bool = True
    search_seed: int = 0
    search_samples: int | None = None
    search_options: dict | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    data_range: float = 2.0
    progress: bool = True
    command: str | None = None
    sampler: Sampler | None = None
    bounds: Any = None
    save_bounds: str | os.PathLike | None = None
    allow_other_model: bool = False  # score tables searched for another model
    guidance: Sequence[float] | None = None  # conditional models: one set of rows per guidance scale w
    clip_model: str | os.PathLike | None = None  # local transformers CLIPModel folder (metric clip)
    plan: MetricPlan | None = None  # set by check_config from `metric`

    @property
    def reference(self) -> Teacher | None:
        """The teacher of the sweep's teacher row (``None`` with ``teacher=False``)."""
        return Teacher(solver="heun", steps=self.teacher_steps) if self.teacher else None


def _check_bounds_config(cfg: SweepConfig, plan: MetricPlan, nfe: list[int],
                         guidance: tuple[float, ...] | None = None) -> Any:
    """The frozen MMHM bounds (loaded, covering the metrics and the method NFEs — at each guidance of a list) or
    ``None``."""
    from eval.mmhm import Bounds, GroupedBounds, load_bounds

    for name in ("bounds", "save_bounds"):
        if getattr(cfg, name) is not None and not plan.mmhm_inputs:
            raise StepsmithError(f"`{name}` freezes MMHM normalisation: add mmhm to `metric` (e.g. fid,kid,"
                                 "precision,mmhm)", param=name)
    b = cfg.bounds
    if b is None:
        return None
    b = b if isinstance(b, (Bounds, GroupedBounds)) else load_bounds(b)
    cells = nfe if guidance is None else [(n, w) for n in nfe for w in guidance]
    check_bounds(b, plan, cells if cfg.methods and not cfg.tables else None)
    return b


def check_config(cfg: SweepConfig, adapter) -> SweepConfig:
    """The config with its metrics resolved and NFE budgets as ints; clear errors for impossible ones,
    all before any model call."""
    names = parse_metrics(cfg.metric) or (resolve_metric(adapter, None),)
    plan = plan_metrics(adapter, names, teacher=cfg.teacher, features=cfg.features)
    metric = plan.main
    num = cfg.num
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise StepsmithError(f"`num` must be an integer of at least 2, got {num!r}", param="num")
    if metric == "teacher" and not cfg.teacher:
        raise StepsmithError("`metric` teacher needs the reference sampler: pass teacher=True", param="teacher")
    nfe = [int(n) for n in cfg.nfe]
    if cfg.methods and (not nfe or any(n < 1 for n in nfe)):
        raise StepsmithError(f"`nfe` must list positive integers, got {nfe}", param="nfe")
    guidance = _check_guidance_list(cfg.guidance, adapter)
    bounds = _check_bounds_config(cfg, plan, nfe, guidance)
    _check_pipeline_config(cfg, adapter, plan)
    return replace(cfg, metric=metric, nfe=nfe, plan=plan, bounds=bounds, guidance=guidance)


def _check_pipeline_config(cfg: SweepConfig, adapter, plan: MetricPlan) -> None:
    """Pipeline models are scored on decoded images: FID-type metrics need ``features`` and ``real``
    images; ``clip`` needs a local CLIP folder."""
    if "clip" in plan.names:
        from eval.clip_score import check_clip_folder

        check_clip_folder(cfg.clip_model)
    if getattr(adapter, "pipeline", None) is None:
        return
    image_metrics = [n for n in plan.computed if n not in ("teacher", "clip")]
    if image_metrics and cfg.features is None:
        raise StepsmithError(f"{', '.join(image_metrics)} on the decoded images of {adapter.name} need a feature network: "
                             "pass --features inception (with --inception-weights FILE) or path/to/file.py:attr, and "
                             "--real (real images); or use --metric teacher / clip", param="features")
    if image_metrics and cfg.real is None:
        raise StepsmithError(f"{', '.join(image_metrics)} on {adapter.name} need real images: pass --real (a folder of PNGs "
                             f"or a safetensors tensor [N, {', '.join(map(str, image_shape(adapter)))}] in [-1, 1])",
                             param="real")


def _check_guidance_list(guidance: Sequence[float] | None, adapter) -> tuple[float, ...] | None:
    """The sweep's guidance scales (``None``: the model's own); refused for unconditional models."""
    if guidance is None:
        return None
    from schedules.conditioning import ConditionalAdapter, _check_guidance

    ws = tuple(_check_guidance(w) for w in ([guidance] if isinstance(guidance, (int, float)) else guidance))
    if not ws or len(set(ws)) != len(ws):
        raise StepsmithError(f"`guidance` must list distinct scales, e.g. 1,3,5; got {list(ws)}", param="guidance")
    if not isinstance(adapter, ConditionalAdapter):
        raise StepsmithError(f"{adapter.name} is unconditional; guidance applies to conditional models only",
                             param="guidance")
    return ws


def image_shape(adapter) -> tuple[int, ...]:
    """The shape of a sample as the metrics see it: the decoded image [3, H, W] of a pipeline model, else the sample."""
    pipe = getattr(adapter, "pipeline", None)
    if pipe is None:
        return tuple(adapter.sample_shape)
    cond = adapter.conditioning
    return (int(pipe.vae.config.out_channels), int(cond.height), int(cond.width))


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (table, label) to score."""

    label: str
    table: TimestepTable
    source: str  # "method" | "table" | path of a table file
    make_seconds: float = 0.0
    search_seed: int | None = None


def search_seeds(table: TimestepTable) -> set[int]:
    """Seeds whose noises a table's search used (``provenance['seed']`` / ``['seeds']``)."""
    prov = table.provenance or {}
    out: set[int] = set()
    if isinstance(prov.get("seed"), int):
        out.add(int(prov["seed"]))
    if isinstance(prov.get("seeds"), list):
        out.update(int(s) for s in prov["seeds"] if isinstance(s, int))
    return out


def _first_seed(table: TimestepTable) -> int | None:
    seeds = sorted(search_seeds(table))
    return seeds[0] if seeds else None


def _table_cell(adapter, t: TimestepTable | str | os.PathLike, allow_other_model: bool = False) -> Cell:
    from schedules.adapters import check_table_model

    label = None
    if isinstance(t, tuple):  # (label, table): a row name of the caller's choice (e.g. dp-teacher-mse)
        label, t = t
    table = t if isinstance(t, TimestepTable) else load_table(t)
    check_table_model(table.model, adapter.name, allow_other_model=allow_other_model)
    table.check_compatible(adapter.convention, adapter.prediction, what=adapter.name)
    table.check_conditioning(getattr(adapter, "conditioning", None))  # warns for another guidance / condition set
    src = "table" if isinstance(t, TimestepTable) else str(t)
    return Cell(label or table.method, table, src, float(table.provenance.get("seconds") or 0.0), _first_seed(table))


def _method_cell(adapter, cfg: SweepConfig, method: str, nfe: int) -> Cell:
    from schedules.baselines import BASELINES
    from schedules.search import make_table

    options = {} if method in BASELINES else dict(cfg.search_options or {})
    kwargs = {"seed": cfg.search_seed, "progress": False, **options}
    if cfg.search_samples is not None:
        kwargs["samples"] = cfg.search_samples
    t0 = time.perf_counter()
    table = make_table(adapter, method, int(nfe), cfg.solver, **kwargs)
    return Cell(method, table, "method", time.perf_counter() - t0, _first_seed(table))


def _unique_labels(cells: list[Cell]) -> None:
    """Make (label, NFE) unique: ``label#2`` for repeats of a method, the file stem for repeated table files."""
    seen: dict[tuple[str, int], int] = {}
    for c in cells:
        k = (c.label, int(c.table.nfe))
        seen[k] = seen.get(k, 0) + 1
        if seen[k] > 1:
            c.label = f"{c.label}#{seen[k]}" if c.source in ("method", "table") else Path(c.source).stem


def build_cells(adapter, cfg: SweepConfig) -> list[Cell]:
    """The given tables, then every method at every NFE (searched without a progress bar)."""
    cells = [_table_cell(adapter, t, cfg.allow_other_model) for t in cfg.tables or ()]
    cells += [_method_cell(adapter, cfg, m, n) for m in cfg.methods or () for n in cfg.nfe]
    if not cells:
        raise StepsmithError("nothing to evaluate: give `tables` (table files or TimestepTable objects) or `methods` "
                             "(e.g. uniform,dp)")
    _unique_labels(cells)
    return cells


def prepare_cells(adapter, cfg: SweepConfig, dist: Dist) -> tuple[list[Cell], list[int]]:
    """Cells made once on the main process and shared; refuses tables searched on the evaluation seed.

    Returns the cells and the sorted search seeds they used.
    """
    cells: list[Cell] | None = None
    error: str | None = None
    if dist.main:
        try:
            cells = build_cells(adapter, cfg)
        except StepsmithError as exc:
            error = str(exc)
    cells, error = dist.broadcast((cells, error))
    if error:
        raise StepsmithError(error)
    used = sorted({s for c in cells for s in search_seeds(c.table)})
    if cfg.seed in used:
        raise StepsmithError(
            f"evaluation seed {cfg.seed} was used to search a table (search seeds {used}); evaluate on "
            f"held-out noises: pass another `seed` (default {DEFAULT_EVAL_SEED})", param="seed")
    return cells, used


# --------------------------------------------------------------------------- real data


@dataclass
class RealData:
    """Real samples and, for FID/KID, the feature network and the real statistics."""

    x: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    net: Any = None
    stats: FeatureStats | None = None
    warnings: list[str] = field(default_factory=list)


def load_real(adapter, cfg: SweepConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The real samples (given tensor, file, or the embedded model's data) and what the report says of them."""
    from eval.data import default_real_data, load_real_data, tensor_hash

    if cfg.real is None:
        x, source = default_real_data(adapter.name, cfg.num, cfg.seed + 1 if cfg.real_seed is None else cfg.real_seed)
    elif isinstance(cfg.real, torch.Tensor):
        x, source = check_samples(cfg.real, "real data"), "tensor"
    else:
        x, source = load_real_data(cfg.real, image_shape(adapter)), str(cfg.real)
    if tuple(x.shape[1:]) != image_shape(adapter):
        raise StepsmithError(f"real data have samples of shape {list(x.shape[1:])} but {adapter.name} makes "
                             f"{list(image_shape(adapter))}; give real data of the model's size and channels")
    return x, {"source": source, "n": int(x.shape[0]), "sha256": tensor_hash(x)}


def _real_stats(real_x: torch.Tensor, net, cfg: SweepConfig, dist: Dist) -> tuple[FeatureStats, dict]:
    """Real feature statistics; the main process computes and caches them before the others read the cache."""
    from eval.data import real_feature_stats

    if dist.main:
        out = real_feature_stats(real_x, net, cache=cfg.cache, use_cache=cfg.use_cache)
        dist.barrier()
        return out
    dist.barrier()
    return real_feature_stats(real_x, net, cache=cfg.cache, use_cache=cfg.use_cache)


def prepare_real(adapter, cfg: SweepConfig, dist: Dist) -> RealData:
    """Real data for the metrics (none for ``teacher`` alone), with the feature network and statistics
    for the image metrics (FID/KID, precision/recall/density/coverage, IS)."""
    plan = cfg.plan
    if not plan.needs_real:
        return RealData()
    x, info = load_real(adapter, cfg)
    real = RealData(x, info)
    if not plan.needs_feature_net:
        return real
    from eval.features import load_feature_network

    features = cfg.features
    if features is None:
        from eval.features import default_feature_network

        features = default_feature_network(adapter.name, adapter.sample_shape)
    real.net = net = load_feature_network(features, inception_weights=cfg.inception_weights)
    net.probe(x[:2])
    real.stats, info["stats_cache"] = _real_stats(x, net, cfg, dist)
    info["feature_network"] = {"name": net.name, "num_features": net.num_features, "weights_sha256": net.weights_hash()}
    few = cfg.num < net.num_features or real.stats.n < net.num_features
    if few and any(n in ("fid", "kid") for n in plan.names):
        msg = (f"N={cfg.num} generated / {real.stats.n} real samples < {net.num_features} feature dimensions: FID is "
               "singular and strongly biased; compare only at equal N")
        real.warnings.append(msg)
        warnings.warn(msg, FewSamplesWarning, stacklevel=3)
    return real


# --------------------------------------------------------------------------- scorer


def _shard_features(net, x_shard: torch.Tensor) -> torch.Tensor:
    if x_shard.shape[0]:
        return extract_features(net, x_shard)
    return torch.zeros(0, net.num_features, dtype=torch.float64)


class Scorer:
    """Scores a shard of samples with the sweep's metrics; collective calls on every rank.

    ``score`` returns (main value, extra values, listed metrics): the first two as a one-name
    sweep always had them, the third only for a metric list (``plan.extended``).
    """

    def __init__(self, metric: str, dist: Dist, real: RealData, *, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0, plan: MetricPlan | None = None,
                 labels: torch.Tensor | None = None, clip: Any = None, prompts: Sequence[str] | None = None,
                 prompt_index: torch.Tensor | None = None):
        self.metric, self.dist, self.real, self.seed = metric, dist, real, seed
        self.clip, self.prompts, self.prompt_index = clip, prompts, prompt_index  # metric clip (text-to-image)
        self.labels = labels  # class-conditional sweeps: this process's samples' intended labels
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.plan = plan or MetricPlan((metric,), False, real.net is not None)
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.teacher_features: torch.Tensor | None = None  # metric fid-teacher: every process's teacher features
        if "fid" in self.plan.names:
            self.fid = fid_metric(real.net.num_features)
            # real sums live on rank 0 only: torchmetrics sums every state across processes
            set_real_stats(self.fid, real.stats if dist.main else None)

    def score(self, x_shard: torch.Tensor) -> tuple[float | None, dict[str, float], dict[str, float]]:
        """(main value, extra values, listed metrics) of the samples gathered over the processes."""
        self._memo = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FewSamplesWarning)
            value, extra = self._main(x_shard)
            listed = self._listed(x_shard, value, extra) if self.plan.extended else {}
        self._memo = None
        return (listed.get(self.metric) if value is None else value), extra, listed

    def set_teacher(self, x_shard: torch.Tensor) -> None:
        """The teacher's samples (this process's shard), the reference of ``fid-teacher`` for the rows that follow."""
        if "fid-teacher" in self.plan.names:
            self._memo = None
            self.teacher_features = self._features(x_shard)[1]
            self._memo = None

    def _main(self, x_shard: torch.Tensor) -> tuple[float | None, dict[str, float]]:
        """A legacy main metric's value and extras; ``(None, {})`` for teacher and the newer metrics."""
        if self.metric == "fid":
            return self._fid(x_shard)
        if self.metric == "kid":
            return self._kid(x_shard)
        if self.metric == "wasserstein":
            m = lowdim_metrics(self.dist.gather_cat(x_shard), self.real.x)
            return m["wasserstein"], {"mmd": m["mmd"], "energy": m["energy"]}
        return None, {}

    def _features(self, x_shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this shard's, every process's) features, computed once per :meth:`score`; raw points for vectors."""
        if self._memo is None or self._memo[0] is not x_shard:
            if self.real.net is None:
                f = x_shard.reshape(x_shard.shape[0], -1).to(torch.float64)
            else:
                f = _shard_features(self.real.net, x_shard)
            self._memo = (x_shard, f, self.dist.gather_cat(f))
        return self._memo[1], self._memo[2]

    def _real_features(self) -> torch.Tensor:
        if self.real.net is None:
            return self.real.x.reshape(self.real.x.shape[0], -1).to(torch.float64)
        return self.real.stats.features

    def _fid_value(self, x_shard: torch.Tensor) -> float:
        f, _ = self._features(x_shard)
        self.fid.reset()
        if f.shape[0]:
            self.fid.update(f, real=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchmetrics' compute-before-update on empty shards
            return fid_from_metric(self.fid)

    def _fid(self, x_shard: torch.Tensor) -> tuple[float, dict[str, float]]:
        """FID, plus KID from the same features at no extra sampling cost (unbiased, so it reads well at small N)."""
        v = self._fid_value(x_shard)
        extra: dict[str, float] = {}
        _, f_all = self._features(x_shard)
        real_f = self.real.stats.features if self.real.stats is not None else None
        if real_f is not None and f_all.shape[0] >= 2 and real_f.shape[0] >= 2:
            size = min(self.kid_subset_size, f_all.shape[0], real_f.shape[0])
            extra["kid"], extra["kid_std"] = kid_from_features(real_f, f_all, subsets=self.kid_subsets,
                                                               subset_size=size, seed=self.seed)
        return v, extra

    def _kid(self, x_shard: torch.Tensor) -> tuple[float, dict[str, float]]:
        _, f = self._features(x_shard)
        mean, std = kid_from_features(self.real.stats.features, f, subsets=self.kid_subsets,
                                      subset_size=self.kid_subset_size, seed=self.seed)
        return mean, {"kid_std": std}

    def _listed(self, x_shard: torch.Tensor, value: float | None, extra: dict[str, float]) -> dict[str, float]:
        """Every listed metric computable from the samples (``teacher`` is added by the row, ``mmhm`` later)."""
        names = self.plan.computed
        out: dict[str, float] = {}
        if value is not None:
            out[self.metric] = value
        if "kid" in extra:
            out.setdefault("kid", extra["kid"])
        if "fid" in names and "fid" not in out:
            out["fid"] = self._fid_value(x_shard)
        if "kid" in names and "kid" not in out:
            out["kid"] = self._kid(x_shard)[0]
        if "wasserstein" in names and "wasserstein" not in out:
            out["wasserstein"] = self._main_wasserstein(x_shard)
        if "fid-teacher" in names:
            if self.teacher_features is None:
                raise StepsmithError("fid-teacher: no teacher samples scored yet (the teacher row comes first)")
            # max: the teacher against itself comes out at ±1e-9 from the matrix square root, not below 0
            out["fid-teacher"] = max(0.0, fid_from_features(self.teacher_features, self._features(x_shard)[1]))
        if any(n in names for n in ("precision", "recall", "density", "coverage")):
            out.update(manifold_values(self._real_features(), self._features(x_shard)[1], names))
        if "is" in names:
            out["is"] = inception_score_of(self.real.net, x_shard, self.dist.gather_cat)
        if "class-accuracy" in names:
            out["class-accuracy"] = class_accuracy_of(self.real.net, x_shard, self.labels, self.dist.gather_cat)
        if "clip" in names:  # decoded images in [-1, 1] → [0, 1]; sample i ↔ prompt i mod P
            s = self.clip.per_sample((x_shard + 1) / 2, self.prompts, self.prompt_index)
            out["clip"] = float(self.dist.gather_cat(s).mean())
        return {n: out[n] for n in names if n in out}

    def _main_wasserstein(self, x_shard: torch.Tensor) -> float:
        return lowdim_metrics(self.dist.gather_cat(x_shard), self.real.x)["wasserstein"]


def build_scorer(cfg: SweepConfig, real: RealData, dist: Dist, labels: torch.Tensor | None = None,
                 adapter: Any = None) -> Scorer | None:
    """The real-data scorer of the sweep's metrics (``None`` for ``teacher`` alone, scored by MSE)."""
    wants_clip = "clip" in cfg.plan.names
    if not cfg.plan.needs_real and not wants_clip:
        return None
    size = min(cfg.kid_subset_size, cfg.num, real.stats.n) if cfg.metric == "kid" else cfg.kid_subset_size
    clip = prompts = index = None
    if wants_clip:
        from eval.clip_score import load_clip

        cond = adapter.conditioning  # check_applicable: a prompt-conditioned pipeline
        clip, prompts, index = load_clip(cfg.clip_model), cond.prompts, cond.condition_index(sample_indices(cfg, dist))
    return Scorer(cfg.metric, dist, real, kid_subsets=cfg.kid_subsets, kid_subset_size=size, seed=cfg.seed,
                  plan=cfg.plan, labels=labels, clip=clip, prompts=prompts, prompt_index=index)


def sample_indices(cfg: SweepConfig, dist: Dist) -> torch.Tensor:
    """Indices of this process's samples among the sweep's ``num`` (sample i has condition i mod P in every row)."""
    return torch.arange(cfg.num)[dist.shard(cfg.num)]


def intended_labels(adapter, cfg: SweepConfig, dist: Dist) -> torch.Tensor | None:
    """The class each of this process's samples is generated for (class-conditional models), else None."""
    cond = getattr(adapter, "conditioning", None)
    if cond is None or cond.kind != "class":
        return None
    return cond.labels_of(sample_indices(cfg, dist))


def coupled_fidelity(dist: Dist, x: torch.Tensor, ref: torch.Tensor, n_total: int,
                     data_range: float) -> dict[str, float]:
    """:func:`eval.metrics.teacher_fidelity` of this shard's pairs, with the squared error summed over processes."""
    se = float((x.to(torch.float64) - ref.to(torch.float64)).pow(2).sum()) if x.shape[0] else 0.0
    dim = x[0].numel() if x.shape[0] else ref[0].numel() if ref.shape[0] else 1
    return fidelity_from_squared_error(dist.sum(se), n_total, dim, data_range)


# --------------------------------------------------------------------------- the run


class Grids:
    """Sample grids under ``out/grids`` (main process only; ``size`` 0 or no ``out``: none)."""

    def __init__(self, out_dir: Path | None, size: int, enabled: bool, reference: torch.Tensor | None = None):
        self.out_dir, self.size, self.enabled, self.reference = out_dir, size, enabled, reference

    def draw(self, x: torch.Tensor, name: str, title: str) -> str | None:
        """Save up to ``size`` samples as ``grids/<name>.png``; returns the path relative to ``out``."""
        if self.out_dir is None or not self.enabled or self.size <= 0 or x.shape[0] == 0:
            return None
        from schedules.viz import save_samples

        p = save_samples(x[:self.size], self.out_dir / "grids" / f"{name}.png", title=title, reference=self.reference)
        return str(p.relative_to(self.out_dir))


@dataclass
class SweepRun:
    """What scoring the rows shares: the model, this process's noises, the progress bar and the grids."""

    adapter: Any
    cfg: SweepConfig
    dist: Dist
    noise: torch.Tensor
    bar: Any
    grids: Grids
    guidance: float | None = None  # the guidance scale of these rows (a guidance-list sweep)

    @property
    def suffix(self) -> str:
        """Grid file suffix of the rows' guidance (``_w3``), empty without a guidance list."""
        return "" if self.guidance is None else "_w" + _safe(f"{self.guidance:g}")

    @property
    def title(self) -> str:
        return "" if self.guidance is None else f", guidance {self.guidance:g}"

    @property
    def n_batches(self) -> int:
        return math.ceil(max(self.noise.shape[0], 1) / self.cfg.batch_size)


def start_run(adapter, cfg: SweepConfig, dist: Dist, cells: list[Cell], real: RealData,
              stage: Path | None = None) -> SweepRun:
    """This process's slice of the shared noises, a progress bar in NFE·batches, and the grid drawer
    (grids go to ``stage``, the folder the outputs are built in before they move to ``out``)."""
    from tqdm.auto import tqdm

    noise = adapter.noise(cfg.num, cfg.seed)[dist.shard(cfg.num)]
    n_batches = math.ceil(max(noise.shape[0], 1) / cfg.batch_size)
    teacher_nfe = cfg.reference.nfe if cfg.teacher else 0
    total = sum(c.table.nfe for c in cells) * n_batches + teacher_nfe * n_batches
    bar = tqdm(total=total, desc="eval sweep", unit="NFE·batch", disable=not (cfg.progress and dist.main),
               file=sys.stderr)
    reference = real.x[:2000] if (real.x is not None and len(adapter.sample_shape) == 1) else None
    return SweepRun(adapter, cfg, dist, noise, bar, Grids(stage, cfg.grid, dist.main, reference))


def _timed_score(scorer: Scorer | None,
                 x: torch.Tensor) -> tuple[float | None, dict[str, float], dict[str, float], float]:
    t0 = time.perf_counter()
    value, extra, listed = scorer.score(x) if scorer is not None else (None, {}, {})
    return value, extra, listed, time.perf_counter() - t0


def teacher_row(run: SweepRun, scorer: Scorer | None) -> tuple[dict[str, Any], torch.Tensor]:
    """The teacher's row (its own score: the floor of the plot) and its samples from this process's noises."""
    adapter, teacher = run.adapter, run.cfg.reference
    calls0 = adapter.calls
    run.bar.set_postfix_str(f"teacher ({teacher.steps} Heun steps)")
    t0 = time.perf_counter()
    with bind(sample_indices(run.cfg, run.dist)):
        ref_x = teacher_sample(adapter, run.noise, teacher, batch_size=run.cfg.batch_size,
                               on_batch=lambda _done: run.bar.update(teacher.nfe)).x.detach().cpu()
    if ref_x.shape[0]:
        check_samples(ref_x, "reference samples", min_n=1)
    t_sample = time.perf_counter() - t0
    row: dict[str, Any] = {"label": "teacher", "solver": teacher.solver, "steps": teacher.steps, "nfe": teacher.nfe,
                           "n": run.cfg.num, "model_calls": run.dist.sum(adapter.calls - calls0),
                           "sampler": teacher.describe()}
    images = decoded(run, ref_x)
    if scorer is not None:
        scorer.set_teacher(images)  # fid-teacher's reference: this scale's teacher
    value, extra, listed, t_metric = _timed_score(scorer, images)
    row.update(value=0.0 if value is None else value, extra=extra)
    if run.cfg.plan.extended:
        row["metrics"] = {**listed, **({"teacher": 0.0} if "teacher" in run.cfg.plan.names else {})}
    row["timings"] = {"sample_seconds": round(t_sample, 3), "metric_seconds": round(t_metric, 3)}
    row["grid"] = run.grids.draw(images, "teacher" + run.suffix, f"{adapter.name}: teacher (Heun {teacher.steps} steps)"
                                 + run.title)
    return row, ref_x


def decoded(run: SweepRun, x: torch.Tensor) -> torch.Tensor:
    """What the image metrics and grids see: a pipeline model's latents decoded by its VAE (micro-batched) to
    images in [-1, 1]; other models' samples as they are."""
    if getattr(run.adapter, "pipeline", None) is None or x.shape[0] == 0:
        return x
    from schedules.cli_sample import decode_latents

    return decode_latents(run.adapter, x, batch_size=max(1, min(run.cfg.batch_size, 32))) * 2 - 1


@torch.no_grad()
def sample_batched(adapter, noise: torch.Tensor, sigmas, solver: str, batch_size: int, on_batch=None,
                   table: TimestepTable | None = None) -> torch.Tensor:
    """:func:`schedules.solvers.sample` in micro-batches of ``batch_size`` (``on_batch()`` after each), on the CPU;
    with ``table``, :func:`schedules.solvers.sample_table` (tables that replay their own data, e.g. olss)."""
    from schedules.solvers import sample, sample_table

    out = []
    for sl in micro_batches(noise.shape[0], batch_size):
        with bind(sl):  # conditional models: every micro-batch keeps its samples' conditions
            x = sample(adapter, noise[sl], sigmas, solver) if table is None else sample_table(adapter, noise[sl], table)
            out.append(x.detach().cpu())
        if on_batch is not None:
            on_batch()
    return torch.cat(out) if out else noise[:0].cpu()


def reference_batched(adapter, noise: torch.Tensor, steps: int, batch_size: int, on_batch=None) -> torch.Tensor:
    """The sweep's teacher samples: ``teacher_sample`` with ``Teacher("heun", steps)``, micro-batched, on the CPU."""
    callback = None if on_batch is None else (lambda _done: on_batch())
    run = teacher_sample(adapter, noise, Teacher(solver="heun", steps=steps), batch_size=batch_size, on_batch=callback)
    return run.x.detach().cpu()


def sample_cell(run: SweepRun, table: TimestepTable) -> torch.Tensor:
    """A cell's samples from this process's noises: the built-in solver, or the config's ``sampler``."""
    noise, bs, sampler = run.noise, run.cfg.batch_size, run.cfg.sampler
    if sampler is None:
        return sample_batched(run.adapter, noise, table.sigmas, table.solver, bs, lambda: run.bar.update(table.nfe),
                              table=table)
    x = torch.cat([_bound_call(sampler, table, noise, sl) for sl in micro_batches(noise.shape[0], bs)]
                  or [noise[:0].cpu()])
    run.bar.update(table.nfe * run.n_batches)
    if tuple(x.shape) != tuple(noise.shape):
        raise StepsmithError(f"sampler returned {list(x.shape)} for noise {list(noise.shape)}; it must return "
                             "one sample per noise, of the model's shape")
    return x


def _bound_call(sampler, table: TimestepTable, noise: torch.Tensor, sl: slice) -> torch.Tensor:
    with bind(sl):
        return sampler(table, noise[sl]).detach().cpu()


def score_cell(run: SweepRun, c: Cell, scorer: Scorer | None, ref_x: torch.Tensor | None) -> dict[str, Any]:
    """One row: sample the cell, score it against the real data and (coupled) against the teacher."""
    t, cfg = c.table, run.cfg
    run.bar.set_postfix_str(f"{c.label} NFE {t.nfe}")
    calls0 = run.adapter.calls
    t0 = time.perf_counter()
    with bind(sample_indices(cfg, run.dist)):  # the same samples, hence the same conditions, in every row
        x = sample_cell(run, t)
    if x.shape[0]:
        check_samples(x, f"samples of {c.label} at NFE {t.nfe}", min_n=1)
    t_sample = time.perf_counter() - t0
    row: dict[str, Any] = {
        "label": c.label, "method": t.method, "nfe": int(t.nfe), "steps": int(t.steps), "solver": t.solver,
        "sigmas": t.sigmas, "timesteps": t.timesteps, "source": c.source, "search_seed": c.search_seed,
        "search_provenance": t.provenance, "n": cfg.num, "model_calls": run.dist.sum(run.adapter.calls - calls0),
    }
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if ref_x is not None:
        fidel = coupled_fidelity(run.dist, x, ref_x, cfg.num, cfg.data_range)
        extra["teacher_mse"], extra["teacher_psnr"] = fidel["mse"], fidel["psnr"]
    images = decoded(run, x)  # pipeline models: images for the image metrics; teacher MSE/PSNR stay on latents
    value, more, listed, _ = _timed_score(scorer, images)
    extra.update(more)
    row.update(value=extra["teacher_mse"] if value is None else value, extra=extra)
    if cfg.plan.extended:
        listed = {**listed, **({"teacher": extra["teacher_mse"]} if "teacher" in cfg.plan.names else {})}
        row["metrics"] = {n: listed[n] for n in cfg.plan.computed}
    row["timings"] = {"table_seconds": round(c.make_seconds, 3), "sample_seconds": round(t_sample, 3),
                      "metric_seconds": round(time.perf_counter() - t0, 3)}
    row["grid"] = run.grids.draw(images, f"{_safe(c.label)}_nfe{t.nfe}{run.suffix}",
                                 f"{run.adapter.name}: {c.label} {t.solver} NFE {t.nfe}{run.title}")
    return row


# --------------------------------------------------------------------------- report


def build_report(run: SweepRun, cells: list[Cell], used_seeds: list[int], real: RealData,
                 teacher: dict[str, Any] | None, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The ``stepsmith.eval/v1`` report dict."""
    cfg = run.cfg
    report = {
        "format": REPORT_FORMAT,
        "model": run.adapter.name,
        "model_info": run.adapter.describe(),
        "metric": cfg.metric,
        "lower_is_better": True,
        "num": cfg.num,
        "eval_seed": cfg.seed,
        "eval_noise": f"adapter.noise({cfg.num}, seed={cfg.seed}) — the same noises for every row",
        "search_seeds": used_seeds,
        "seeds_disjoint": cfg.seed not in used_seeds,
        "solver": cfg.solver if cfg.methods else sorted({c.table.solver for c in cells}),
        "nfe": sorted({int(c.table.nfe) for c in cells}),
        "methods": list(dict.fromkeys(c.label for c in cells)),
        "real": real.info,
        "teacher": teacher,
        "results": rows,
        "processes": run.dist.world,
        "batch_size": cfg.batch_size,
        "warnings": real.warnings,
        "seconds_total": round(seconds, 3),
        "command": cfg.command,
        "versions": _versions(),
    }
    if cfg.plan.extended:
        report = _with_metric_list(report, cfg.plan)
    return report


def _with_metric_list(report: dict[str, Any], plan: MetricPlan) -> dict[str, Any]:
    """A metric-list report: ``metrics`` (the names, main first) after ``metric``, the main metric's direction."""
    out: dict[str, Any] = {}
    for k, v in report.items():
        out[k] = v
        if k == "metric":
            out["metrics"] = list(plan.names)
    out["lower_is_better"] = lower_is_better(plan.main)
    return out


def score_mmhm(cfg: SweepConfig, rows: list[dict[str, Any]], dist: Dist,
               source: str = "frozen bounds") -> dict[str, Any] | None:
    """MMHM per NFE group — per (NFE, guidance) cell with a guidance list — into every row's ``metrics`` (when
    listed); saves the bounds used if asked.

    Returns ``report["mmhm"]``: the metrics that went in, ε, the bounds per group and their source.
    """
    if not cfg.plan.mmhm_inputs:
        return None
    used = apply_mmhm(rows, cfg.plan, cfg.bounds)
    each = "NFE" if cfg.guidance is None else "(NFE, guidance) cell"
    source = f"min/max over the rows of each {each}" if cfg.bounds is None else source
    if cfg.save_bounds is not None and dist.main:
        used.save(cfg.save_bounds)
    return mmhm_info(rows, cfg.plan, used, source)


def write_sweep_report(report: dict[str, Any], cfg: SweepConfig, dist: Dist, stage: Path | None) -> None:
    """report.json / report.md / the plot into ``stage``, moved with the grids into ``out`` (main
    process), then wait for every process."""
    if cfg.out is not None and stage is not None:
        from eval.report import publish, write_report

        write_report(report, stage)
        publish(stage, cfg.out)
    dist.barrier()


# --------------------------------------------------------------------------- main entry


def run_sweep(model, config: SweepConfig | None = None, **kwargs: Any) -> dict[str, Any]:
    """Score tables or methods across NFE; returns the report dict (and writes it to ``out``: built in
    a folder beside it and moved in at the end, so a killed sweep leaves ``out`` as it was).

    ``model``: a spec (``builtin:digits-flow``...) or a :class:`~schedules.adapters.ModelAdapter`;
    ``config`` and/or ``kwargs``: the fields of :class:`SweepConfig` (kwargs override ``config``).
    """
    from schedules.adapters import ModelAdapter, load_model

    cfg = replace(config, **kwargs) if config is not None else SweepConfig(**kwargs)
    if cfg.out is not None:  # an existing file, an unwritable place: refused before the model loads
        check_output_path(cfg.out, param="out", folder=True)
    bounds_source = f"frozen: {cfg.bounds}" if isinstance(cfg.bounds, (str, os.PathLike)) else "frozen bounds"
    t_start = time.perf_counter()
    dist = current_dist()
    adapter = model if isinstance(model, ModelAdapter) else load_model(str(model))
    cfg = check_config(cfg, adapter)
    groups = guidance_groups(adapter, cfg, dist)
    cells = [c for g in groups for c in g.cells]
    used_seeds = sorted({s for g in groups for s in g.seeds})
    if cfg.bounds is not None:
        check_bounds(cfg.bounds, cfg.plan, sorted({(int(c.table.nfe), g.guidance) for g in groups for c in g.cells},
                                                  key=lambda k: (k[0], k[1] or 0.0)))
    real = prepare_real(adapter, cfg, dist)
    scorer = build_scorer(cfg, real, dist, intended_labels(adapter, cfg, dist), adapter)
    stage = staging_folder(cfg.out) if cfg.out is not None and dist.main else None
    try:
        run = start_run(adapter, cfg, dist, cells, real, stage)
        if cfg.teacher and len(groups) > 1:  # one teacher per guidance
            run.bar.total += cfg.reference.nfe * run.n_batches * (len(groups) - 1)
        teachers, rows = [], []
        for g in groups:  # the same noises (run.noise) and conditions in every group
            grun = replace(run, adapter=g.adapter, guidance=g.guidance)
            teacher, ref_x = teacher_row(grun, scorer) if cfg.teacher else (None, None)
            new = [score_cell(grun, c, scorer, ref_x) for c in g.cells]
            for r in ([teacher] if teacher is not None else []) + new:
                if g.guidance is not None:
                    r["guidance"] = g.guidance
            teachers.append(teacher)
            rows += new
        run.bar.close()
        mmhm = score_mmhm(cfg, rows, dist, bounds_source)
        report = build_report(run, cells, used_seeds, real, teachers[0], rows, time.perf_counter() - t_start)
        if getattr(adapter, "pipeline", None) is not None:
            report["metric_space"] = ("image metrics (FID/KID/CLIP/...) and grids on the VAE-decoded images; "
                                      "MSE / PSNR to the teacher on the final latents")
        if cfg.guidance is not None:
            report["guidance"] = list(cfg.guidance)
            report["teachers"] = teachers if cfg.teacher else None
        if mmhm is not None:
            report["mmhm"] = mmhm
        write_sweep_report(report, cfg, dist, stage)
    finally:  # a failed sweep leaves no half-built folder
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return report


@dataclass
class GuidanceGroup:
    """The model at one guidance scale and its cells (searched methods are searched at that scale)."""

    guidance: float | None
    adapter: Any
    cells: list[Cell]
    seeds: list[int]


def guidance_groups(adapter, cfg: SweepConfig, dist: Dist) -> list[GuidanceGroup]:
    """One group per guidance scale of ``cfg.guidance`` (:func:`schedules.conditioning.with_guidance`: a pipeline
    model is rebuilt from its pipeline), or the model as it is."""
    from schedules.conditioning import with_guidance

    if cfg.guidance is None:
        return [GuidanceGroup(None, adapter, *prepare_cells(adapter, cfg, dist))]
    out = []
    for w in cfg.guidance:
        m = with_guidance(adapter, w)
        out.append(GuidanceGroup(w, m, *prepare_cells(m, cfg, dist)))
    return out


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _versions() -> dict[str, str]:
    import torchmetrics

    from schedules.table import package_version

    return {"stepsmith": package_version(), "torch": torch.__version__, "torchmetrics": torchmetrics.__version__}


__all__ = ["ALL_METRICS", "DEFAULT_EVAL_SEED", "METRICS", "Cell", "Dist", "Scorer", "SweepConfig", "build_cells", "current_dist",
           "reference_batched", "resolve_metric", "run_sweep", "sample_batched", "search_seeds"]
