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
* ``data-kid``, ``data-fid``, ``data-wasserstein`` — the same distances between the candidate's search
  samples and **real data** instead of the teacher's samples (AutoDiffusion, Li et al. 2023, searches
  on FID against real data): the model's embedded data set (:func:`model_data`; all 1,797 digits, or
  fresh two-moons points for toy2d), data given to :func:`make_scorer` (``data=``), or data registered
  for the model name (:func:`register_data`, ``stepsmith search --data PATH``). The real features are
  computed once. On a class-conditional model with a classifier head on its feature network
  (digits-cond), a candidate whose samples are classified as the teacher's sample from the same noise
  less often than ``1 - CLASS_GUARD_MARGIN`` is rejected (:func:`class_guard`).

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

Data objectives, measured 2026-12-02 with the bench protocol (dp, 32 search samples of seed 0, grid 60,
candidates 6, max_sweeps 2; ``stepsmith eval --num 500 --seed 10000 --no-teacher``), FID:

* digits-cond, Euler, ``--classes all --guidance 3``, ``data-kid`` (class guard 0.05): **278.4 / 278.9 /
  285.7** at NFE 4 / 6 / 8, class accuracy 0.994 / 0.994 / 0.996 — vs dp on feature-mse 852.5 / 846.7 /
  802.6 and ``leading`` 346.4 / 428.2 / 512.4 (the best baseline; both ≥ 0.998 class accuracy). The
  tables start at σ = 0.72 instead of 1 (as ``leading`` does): from pure noise that leaves the guided
  sampler, and the FID against unguided real data rewards undoing part of the guidance (search-seed
  mse to the guided teacher 0.072 at NFE 4). So it is the objective for "match the data", not for
  "reproduce the guided sampler" — a choice of target, left opt-in (``auto`` unchanged). The image grids
  say why it must stay opt-in: in the benchmark run of 2026-12-02 (BENCHMARKS.md row ``dp-data-fid``) the
  data-fid samples at NFE 6 are covered in residual pixel noise, visibly worse than the clean guided digits of
  the feature-mse table (and grainier than ``leading``'s): the digits feature network scores noise as "data-like"
  (FID 256.7 vs 825.6), so a lower FID here is not better images.
  128 search samples at NFE 4: FID 298.8, class accuracy 0.990 (search 462 s vs 265 s for 32).
  ``data-fid`` (same guard): **268.6 / 256.7 / 283.7**, class accuracy 0.996 / 0.994 / 0.996 (its
  Fréchet distance from 32 samples against 1,797 is biased, but the bias is nearly the same for every
  candidate; search-seed mse to the guided teacher 0.081 / 0.094 / 0.046). A strict guard (margin 0)
  with ``data-kid`` at NFE 4: FID 267.2, class accuracy 0.994 — 32 search samples cannot see a drop
  of a few in 500, so the guard only stops gross class loss.
* unconditional models, ``data-kid`` vs the default feature-mse: digits-flow Euler NFE 4 / 6
  172.6 / 133.2 (feature-mse 189.8 / 126.4); sharp-ddpm DDIM NFE 4 / 6 118.0 / 215.6 (74.0 / 65.2;
  128 search samples at NFE 4: 83.6). On sharp-ddpm the 32-sample KID against data is a noisy target
  that picks odd tables; it does not replace feature-mse there. ``data-fid``: digits-flow 207.9 / 135.4,
  sharp-ddpm 85.5 / 80.0 — worse than feature-mse in all four cells.
* toy2d-flow Euler, exact W2 (grid 100), at eval seeds 10 000 / 20 000, NFE 4, 6, 8:
  teacher-mse 0.2255 0.2089 0.2151 / 0.2148 0.2176 0.2138; ``wasserstein`` (pixel space, vs the teacher)
  0.2238 0.2086 0.2148 / 0.2112 0.2144 0.2083; ``data-wasserstein`` 0.3052 0.2974 0.2844 / 0.2484 0.2399
  0.2304; ``leading`` 0.2326 0.2138 0.1993 / 0.2407 0.2243 0.2286. With 128 search samples teacher-mse
  0.2238 0.2113 0.2076 / 0.2112 0.2141 0.2150, wasserstein 0.2230 0.2072 0.2106 / 0.2106 0.2167 0.2125,
  data-wasserstein 0.2670 0.2681 0.2750 / 0.2161 0.2156 0.2163. ``wasserstein`` is ahead of teacher-mse
  in 6 of 6 cells at 32 samples (by 0.0003–0.0055) and 4 of 6 at 128: smaller than the eval's
  seed-to-seed spread (``leading`` NFE 8 moves from 0.199 to 0.229, so its win over dp at seed 10 000 is
  noise), hence ``auto`` stays teacher-mse for 2-D models; ``data-wasserstein`` is worse everywhere
  (32–128 search points against the data are a noisier target than the teacher's paired samples).
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


def _quantiles(sorted_x: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of ``sorted_x`` [M, S] (sorted along 0) at the ``n`` mid-point quantiles (i + ½) / n, linearly interpolated."""
    m = sorted_x.shape[0]
    if m == n:
        return sorted_x
    pos = ((torch.arange(n, dtype=torch.float64) + 0.5) * m / n - 0.5).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(m - 1)
    w = (pos - lo).unsqueeze(1)
    return sorted_x[lo] * (1 - w) + sorted_x[hi] * w


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, slices: int = SLICES, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between sets [N, D] and [M, D]: sqrt of the mean over ``slices``
    uniform random unit directions (fixed ``seed``) of the mean squared gap of the sorted projections
    (sets of different sizes: the larger one's projections at the smaller one's mid-point quantiles)."""
    a, b = _f64(a), _f64(b)
    if a.shape[1] != b.shape[1]:
        raise StepsmithError(f"sliced wasserstein compares sets of equal dimension, got {list(a.shape)} and {list(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], slices, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    n = min(pa.shape[0], pb.shape[0])
    return math.sqrt(float(((_quantiles(pa, n) - _quantiles(pb, n)) ** 2).mean()))


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
    reference: str = "teacher"  # what the candidate is compared with: the teacher's finals, or real "data"


OBJECTIVES: dict[str, Objective] = {
    "teacher-mse": Objective("teacher-mse", teacher_mse, "never", "final mse"),
    "feature-mse": Objective("feature-mse", feature_mse, "required", "final feature mse"),
    "kid": Objective("kid", kid, "required", "kid"),
    "fid": Objective("fid", fid, "required", "fid"),
    "wasserstein": Objective("wasserstein", sliced_wasserstein, "optional", "sliced wasserstein"),
    # against real data (the model's embedded data set, or ``data=``) instead of the teacher's samples
    "data-kid": Objective("data-kid", kid, "required", "kid", reference="data"),
    "data-fid": Objective("data-fid", fid, "required", "fid", reference="data"),
    "data-wasserstein": Objective("data-wasserstein", sliced_wasserstein, "optional", "sliced wasserstein",
                                  reference="data"),
}


def resolve_objective(objective: str | None, model_name: str | None, features=None) -> str:
    """The objective ``auto`` (or ``None``) stands for: ``feature-mse`` when a feature network is known
    (``features`` given, or the model has an embedded one), else ``teacher-mse``; other names pass through.
    Also for guided models: the data objectives are opt-in (module docstring: their FID gain on digits-cond is
    residual noise)."""
    if objective not in (None, "auto"):
        get_objective(objective)
        return objective
    return "feature-mse" if features is not None or model_name in MODEL_FEATURES else "teacher-mse"


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise StepsmithError(f"unknown `objective` {name!r}; use auto or one of {', '.join(OBJECTIVES)}",
                             param="objective")
    return OBJECTIVES[name]


# real data of the data objectives, per model name: registered by the caller (``stepsmith search --data``)
_USER_DATA: dict[str, torch.Tensor] = {}
TOY2D_DATA_POINTS = 2048  # fresh two-moons points (seed 1) a data objective compares toy2d samples with


def _checked_data(data) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.ndim < 2 or data.shape[0] < 2:
        got = list(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise StepsmithError(f"real data must be a tensor [N, ...] with N ≥ 2 samples, got {got}", param="data")
    if not torch.isfinite(data).all():
        raise StepsmithError("real data contains NaN/Inf", param="data")
    return data.detach().cpu()


def register_data(model_name: str, data: torch.Tensor) -> None:
    """Use ``data`` [N, ...] (N ≥ 2, the model's sample range) as the real data of the data objectives
    (``data-kid``, ``data-fid``, ``data-wasserstein``) for ``model_name``; for callers such as
    dp's refinement that only pass the model name to :func:`make_scorer`."""
    _USER_DATA[model_name] = _checked_data(data)


def model_data(model_name: str | None, data: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """(real data, description) a data objective compares with: ``data`` if given, else data registered
    with :func:`register_data`, else the embedded model's training data (digits: all 1,797 images of
    ``digits_data()``; sharp-ddpm: ``sharp_digits_data()``; toy2d: fresh two-moons points); otherwise a
    StepsmithError saying what to pass."""
    if data is not None:
        return _checked_data(data), f"given data [{data.shape[0]}]"
    if model_name in _USER_DATA:
        x = _USER_DATA[model_name]
        return x, f"registered data [{x.shape[0]}]"
    from schedules.embedded import embedded_data

    found = embedded_data(model_name, TOY2D_DATA_POINTS, 1)
    if found is not None:
        return found
    raise StepsmithError(f"the data objectives compare with real data, and none is known for {model_name}: pass "
                         "--data PATH (a safetensors file with one tensor [N, ...] in the model's range, or a folder of "
                         "PNG/JPEG images) or `data=` a tensor, or use an objective against the teacher (feature-mse, kid, ...)",
                         param="data")


def feature_name(objective: str, model_name: str | None, features, *, check_data: bool = True) -> str | None:
    """The feature network an objective will use (its name), or ``None`` (pixels / not needed).

    Checked before any model call: a ``required`` objective on a model without an embedded feature
    network and without ``features`` is refused with what to pass, and so is a data objective on a
    model without known real data (:func:`model_data`; ``check_data=False`` when the caller has data).
    """
    obj = get_objective(objective)
    if obj.reference == "data" and check_data:
        model_data(model_name)  # refuse early
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
    as a function images [B, 1, 16, 16] in [-1, 1] → float64 features [B, 128]; its ``classify``
    attribute gives the class logits [B, 10] of the CNN's classifier head."""
    from schedules.embedded import load_feature_cnn

    key = name.split(":", 1)[1] if name.startswith("builtin:") else name
    net = load_feature_cnn(key)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x[i:i + 256].to(torch.float32)) for i in range(0, x.shape[0], 256)]).to(torch.float64)

    @torch.no_grad()
    def classify(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net.classify(x[i:i + 256].to(torch.float32)) for i in range(0, x.shape[0], 256)]).to(torch.float64)

    run.name = f"builtin:{key}"
    run.classify = classify
    return run


def _features_fn(name: str | None, features) -> Features | None:
    if name is None:
        return None
    if callable(features):
        return features
    return embedded_features(name)


CLASS_GUARD_MARGIN = 0.05  # default: reject a candidate whose class agreement with the teacher drops below 1 - this
GUARD_PENALTY = 1e6  # added to a rejected candidate's score per unit of agreement below the bound


def class_agreement(classify: Callable[[torch.Tensor], torch.Tensor], cand: torch.Tensor, ref_classes: torch.Tensor) -> float:
    """Fraction of candidate samples whose predicted class (arg-max of ``classify``) is the teacher's."""
    return float((classify(cand).argmax(dim=1) == ref_classes).double().mean())


def class_guard(classify: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                margin: float = CLASS_GUARD_MARGIN) -> Callable[[torch.Tensor, float], float]:
    """``guarded(cand, value)``: ``value``, or a rejection (``value`` + :data:`GUARD_PENALTY` × the shortfall)
    when fewer than ``1 - margin`` of the candidate's samples are classified as the teacher's sample from the
    same noise. A data objective ignores the pairing, so without the guard it may trade the intended classes
    for data likeness (the teacher's classes stand in for the intended ones: its class accuracy is ≥ 0.998 on
    digits-cond at guidance 3)."""
    if not 0 <= margin < 1:
        raise StepsmithError(f"`class_guard` margin must lie in [0, 1), got {margin}", param="class_guard")
    ref_classes = classify(target).argmax(dim=1)
    bound = 1 - margin

    def guarded(cand: torch.Tensor, value: float) -> float:
        agree = class_agreement(classify, cand, ref_classes)
        return value if agree >= bound else value + GUARD_PENALTY * (bound - agree)

    return guarded


def _conditional(model_name: str | None) -> bool:
    from schedules.embedded import CONDITIONAL_MODELS

    return model_name is not None and model_name.removeprefix("builtin:") in CONDITIONAL_MODELS


def make_scorer(objective: str, target: torch.Tensor, *, model_name: str | None = None, features=None,
                data: torch.Tensor | None = None, class_guard_margin: float | str | None = "auto") -> tuple[Scorer, dict]:
    """``score(candidate_final) -> float`` against the fixed teacher finals ``target`` — or, for a data
    objective (``data-kid``, ``data-fid``, ``data-wasserstein``), against real data (``data``, else
    :func:`model_data`; ``target`` then only feeds the class guard) — with the reference features computed
    once, and the provenance of the objective ({"objective", "features"}, plus "data" / "class_guard").

    ``class_guard_margin``: a data objective on a class-conditional model whose feature network has a
    classifier head (``classify``) rejects candidates that lose the teacher's classes (:func:`class_guard`);
    ``"auto"`` = :data:`CLASS_GUARD_MARGIN` there and off elsewhere, ``None`` = off, a float = that margin
    (then the feature network needs a ``classify`` head).
    """
    obj = get_objective(objective)
    fname = feature_name(objective, model_name, features, check_data=data is None)
    feat = _features_fn(fname, features)
    prov: dict = {"objective": objective, "features": fname}
    ref_samples = target
    guard = None
    if obj.reference == "data":
        ref_samples, prov["data"] = model_data(model_name, data)
        classify = getattr(feat, "classify", None)
        margin = class_guard_margin
        if margin == "auto":
            margin = CLASS_GUARD_MARGIN if classify is not None and _conditional(model_name) else None
        if margin is not None:
            if classify is None:
                raise StepsmithError("the class guard needs a feature network with a classifier head (classify), "
                                     "e.g. builtin:digits-features; or pass class_guard_margin=None",
                                     param="class_guard")
            guard = class_guard(classify, target, float(margin))
            prov["class_guard"] = float(margin)
    ref = ref_samples if feat is None else feat(ref_samples)

    def score(cand: torch.Tensor) -> float:
        v = obj.fn(cand if feat is None else feat(cand), ref)
        if not math.isfinite(v):
            raise StepsmithError(f"objective {objective} is not finite ({v}); the model returned NaN/Inf?")
        return v if guard is None else guard(cand, v)

    return score, prov


def objective_kind(objective: str, fname: str | None, teacher_name: str) -> str:
    """``objective_kind`` of a table searched on ``objective`` against the teacher ``teacher_name``
    (a data objective: against real data)."""
    obj = get_objective(objective)
    space = f" in {fname} features" if fname and objective != "feature-mse" else (f" ({fname})" if fname else "")
    against = "real data" if obj.reference == "data" else teacher_name
    return f"{obj.describe}{space} vs {against} (search samples)"
