"""Search objectives by name: what dp's refinement and evolution's fitness minimise.

An objective compares the search samples of a candidate table with the teacher's final samples
from the same noises and returns a float, lower better (:data:`OBJECTIVES`):

* ``teacher-mse`` — mean squared difference of paired samples (the coupled MSE). With few steps
  its minimiser is close to the posterior mean, so it can prefer blurry samples.
* ``feature-mse`` — the same pairing, in the feature space of a feature network (a blurred sample
  moves its features, so a table is not rewarded for averaging).
* ``kid`` — unbiased polynomial-kernel MMD² (k(x, y) = (x·y/D + 1)³) between the two feature sets
  (Bińkowski et al. 2018, "Demystifying MMD GANs"; torchmetrics' KID with one subset of all samples).
* ``fid`` — Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017);
  very biased at the few search samples (N below the feature dimension), so a weak objective.
* ``wasserstein`` — sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) between the
  two sets, in feature space when a feature network is given, else in pixel space: the mean over
  fixed random directions of the squared distance between the sorted projections, square-rooted.

The distribution objectives ignore the pairing; all are computed on the search seeds only.
Feature networks are the embedded ones (``builtin:sharp-features``, ``builtin:digits-features``),
or any callable images → [B, D]; an embedded model uses its own by default.

Default (``auto``, :func:`resolve_objective`): ``feature-mse`` when a feature network is known — the
model's embedded one (:data:`schedules.embedded.MODEL_FEATURES`) or ``features`` given — else
``teacher-mse`` (2-D toys, user and pipeline models without a feature network). Why: the coupled MSE
rewards blur on sharp images (a final jump from high noise to 0 is a posterior mean), and of the
objectives below ``feature-mse`` was the one that beat it in every cell measured, while the
distribution distances chased long final jumps. Held-out FID (``stepsmith eval --num 512 --no-teacher``,
eval seed 10 000, each model's own embedded feature network) of dp tables refined on each objective
from one shared pass per model (32 search samples of seed 0, grid 50, candidates 6, max_sweeps 2;
DDIM on sharp-ddpm, Euler on digits-flow):

==============  ============  ============  =============  =============
objective       sharp NFE 4   sharp NFE 6   digits NFE 4   digits NFE 6
==============  ============  ============  =============  =============
teacher-mse     71.43         69.54         185.38         128.73
feature-mse     **70.96**     **66.25**     **178.81**     125.86
kid             172.31        129.41        180.67         **123.32**
wasserstein     97.12         67.97         **178.81**     125.86
leading         112.44        71.59         311.35         185.85
uniform         684.61        146.74        258.72         156.93
==============  ============  ============  =============  =============

``kid`` and ``wasserstein`` (in features) ignore the pairing and, from 32 search samples, pick tables
with a long final jump on sharp-ddpm (last t = 549 at NFE 4, FID 172; search-seed teacher mse 0.71 vs
0.072): a distribution distance estimated on few samples is a noisy target. ``feature-mse`` keeps the
pairing of ``teacher-mse``, beats it in 4 of 4 cells and is best or tied-best in 3 (sum of FIDs 441.9
vs 455.1; differences of 0.5–6.6 FID at 512 samples and one eval seed, so modest evidence). The
benchmark suite (``stepsmith bench``) searches both at its default settings side by side (rows ``dp``
and ``dp-teacher-mse``; 32 search samples, grid 60, candidates 6, 2 sweeps; N = 500, seed 10 000). Its
run of 2026-12-02 (BENCHMARKS.md), FID feature-mse / teacher-mse:

* sharp-ddpm DDIM NFE 4 / 6 / 8: 74.0 / 82.7, 65.2 / 67.2, 59.5 / 63.3 (leading 112.2, 71.7, 70.5);
* digits-flow Euler NFE 2–10: 399 / 502, 189.8 / 193.0, 126.4 / 130.4, 103.5 / 106.9, 93.3 / 93.3;
* digits-ddpm DDIM NFE 2–10: 529 / 529, **272.7 / 226.5**, **148.5 / 116.5**, 88.7 / 104.5, **88.3 / 86.9**.

feature-mse is better in 8 cells, worse in 3 (digits-ddpm DDIM NFE 4, 6, 10), tied in 3; kept as the
default for models with a feature network, with teacher-mse one option away.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from schedules.embedded import MODEL_FEATURES
from schedules.io import StepsmithError

Features = Callable[[torch.Tensor], torch.Tensor]
Scorer = Callable[[torch.Tensor], float]

DEFAULT_OBJECTIVE = "auto"  # feature-mse where a feature network is known, else teacher-mse (resolve_objective)
SLICES = 256  # random directions of the sliced Wasserstein distance


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def teacher_mse(cand: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over all elements of (candidate - teacher)², samples paired by noise."""
    return float(((cand.to(torch.float64) - target.to(torch.float64)) ** 2).mean())


def kid(a: torch.Tensor, b: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD² with the polynomial kernel (x·y/D + coef)^degree between sets [N, D] and [M, D]."""
    a, b = _f64(a), _f64(b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise StepsmithError("kid needs at least 2 samples in each set; raise `samples`", param="samples")
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + coef) ** degree

    kaa, kbb = k(a, a), k(b, b)
    n, m = a.shape[0], b.shape[0]
    saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(saa + sbb - 2 * k(a, b).mean())


def _sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance |μa - μb|² + tr(Ca + Cb - 2 (Ca^½ Cb Ca^½)^½) between Gaussians fitted to the sets."""
    a, b = _f64(a), _f64(b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise StepsmithError("fid needs at least 2 samples in each set; raise `samples`", param="samples")
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(ra @ cb @ ra).clamp_min(0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, slices: int = SLICES, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size sets [N, D]: sqrt of the mean over ``slices``
    uniform random unit directions (fixed ``seed``) of the mean squared gap of the sorted projections."""
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise StepsmithError(f"sliced wasserstein compares sets of equal size, got {list(a.shape)} and {list(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], slices, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    return math.sqrt(float(((pa - pb) ** 2).mean()))


def feature_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference of paired feature vectors."""
    return teacher_mse(_f64(a), _f64(b))


@dataclass(frozen=True)
class Objective:
    """A named objective: ``fn(candidate, teacher) -> float`` (lower better), on features or samples."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], float]
    features: str  # "never", "optional" (pixels without a network) or "required"
    describe: str


OBJECTIVES: dict[str, Objective] = {
    "teacher-mse": Objective("teacher-mse", teacher_mse, "never", "final mse"),
    "feature-mse": Objective("feature-mse", feature_mse, "required", "final feature mse"),
    "kid": Objective("kid", kid, "required", "kid"),
    "fid": Objective("fid", fid, "required", "fid"),
    "wasserstein": Objective("wasserstein", sliced_wasserstein, "optional", "sliced wasserstein"),
}


def resolve_objective(objective: str | None, model_name: str | None, features=None) -> str:
    """The objective ``auto`` (or ``None``) stands for: ``feature-mse`` when a feature network is known
    (``features`` given, or the model has an embedded one), else ``teacher-mse``; other names pass through."""
    if objective not in (None, "auto"):
        get_objective(objective)
        return objective
    return "feature-mse" if features is not None or model_name in MODEL_FEATURES else "teacher-mse"


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise StepsmithError(f"unknown `objective` {name!r}; use auto or one of {', '.join(OBJECTIVES)}",
                             param="objective")
    return OBJECTIVES[name]


def feature_name(objective: str, model_name: str | None, features) -> str | None:
    """The feature network an objective will use (its name), or ``None`` (pixels / not needed).

    Checked before any model call: a ``required`` objective on a model without an embedded feature
    network and without ``features`` is refused with what to pass.
    """
    obj = get_objective(objective)
    if obj.features == "never":
        if features is not None:
            raise StepsmithError(f"`objective` {objective} does not use a feature network; drop `features`",
                                 param="features")
        return None
    if features is not None:
        if isinstance(features, str):
            return features
        return getattr(features, "name", None) or getattr(features, "__name__", type(features).__name__)
    if model_name in MODEL_FEATURES:
        return MODEL_FEATURES[model_name]
    if obj.features == "required":
        raise StepsmithError(f"`--objective {objective}` needs a feature network: pass --features builtin:NAME "
                             f"(builtin:sharp-features, builtin:digits-features) or a features callable", param="features")
    return None


def embedded_features(name: str) -> Features:
    """An embedded feature CNN (``sharp-features`` / ``digits-features``, optionally ``builtin:``-prefixed)
    as a function images [B, 1, 16, 16] in [-1, 1] → float64 features [B, 128]."""
    from schedules.embedded import load_feature_cnn

    key = name.split(":", 1)[1] if name.startswith("builtin:") else name
    net = load_feature_cnn(key)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x[i:i + 256].to(torch.float32)) for i in range(0, x.shape[0], 256)]).to(torch.float64)

    run.name = f"builtin:{key}"
    return run


def _features_fn(name: str | None, features) -> Features | None:
    if name is None:
        return None
    if callable(features):
        return features
    return embedded_features(name)


def make_scorer(objective: str, target: torch.Tensor, *, model_name: str | None = None, features=None) -> tuple[Scorer, dict]:
    """``score(candidate_final) -> float`` against the fixed teacher finals ``target`` (its features
    computed once), and the provenance of the objective ({"objective", "features"})."""
    obj = get_objective(objective)
    fname = feature_name(objective, model_name, features)
    feat = _features_fn(fname, features)
    ref = target if feat is None else feat(target)

    def score(cand: torch.Tensor) -> float:
        v = obj.fn(cand if feat is None else feat(cand), ref)
        if not math.isfinite(v):
            raise StepsmithError(f"objective {objective} is not finite ({v}); the model returned NaN/Inf?")
        return v

    return score, {"objective": objective, "features": fname}


def objective_kind(objective: str, fname: str | None, teacher_name: str) -> str:
    """``objective_kind`` of a table searched on ``objective`` against the teacher ``teacher_name``."""
    obj = get_objective(objective)
    space = f" in {fname} features" if fname and objective != "feature-mse" else (f" ({fname})" if fname else "")
    return f"{obj.describe}{space} vs {teacher_name} (search samples)"
