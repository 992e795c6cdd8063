"""Sample-quality metrics: FID / KID (torchmetrics), exact low-dimensional distances,
flow straightness and teacher fidelity.

Image metrics run a *feature network* (see :mod:`eval.features`) over images and compare
the two feature clouds:

* :func:`fid` — Fréchet distance between Gaussians fitted to the features, computed by
  ``torchmetrics.image.FrechetInceptionDistance(feature=<module>)``. Features are handed to
  torchmetrics in float64, so its sums, covariances and the result are all float64.
* :func:`kid` — Kernel Inception Distance (unbiased polynomial-kernel MMD², torchmetrics
  ``KernelInceptionDistance``), averaged over random subsets drawn from a fixed seed.

FID is biased at small N (and singular when N is below the feature dimension): compare
numbers only at equal N and protocol. Both refuse N < 2 and warn when N < feature dim.

Low-dimensional data (the 2D toy model) is compared exactly against true samples:
:func:`wasserstein` (POT ``ot.emd2``), :func:`mmd_rbf` (unbiased) and
:func:`energy_distance`.

:func:`flow_straightness` estimates Liu et al.'s S = E ∫ ||(Z1 - Z0) - Ż_t||² dt along a
solver trajectory of a flow model, and :func:`teacher_fidelity` measures how far a table's
samples are from the reference sampler's samples drawn from the same noises.

Distances to the teacher, one name each (``x_i`` and ``ref_i`` from the same noise, D elements a sample):

* ``mse`` / ``teacher_mse`` — mean over all elements of (x - ref)²;
* ``rmse`` / ``teacher_rmse`` — its square root: the per-element root mean square error;
* ``l2`` / ``teacher_l2`` — sqrt(mean_i ||x_i - ref_i||²), the root-mean-square per-sample L2
  distance (= ``rmse``·√D: 16× ``rmse`` on 16×16 digits);
* ``psnr`` / ``teacher_psnr`` — 10·log10(data_range² / mse) in dB.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from schedules.io import StepsmithError


class FewSamplesWarning(UserWarning):
    """Fewer samples than feature dimensions: FID's covariance is singular and very biased."""


# --------------------------------------------------------------------------- checks


def check_samples(x: torch.Tensor, what: str, *, min_n: int = 2) -> torch.Tensor:
    """Refuse non-tensors, too few samples and NaN/Inf; return ``x`` detached on the CPU."""
    if not isinstance(x, torch.Tensor):
        raise StepsmithError(f"{what}: expected a torch tensor [N, ...], got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < min_n:
        n = 0 if x.ndim < 1 else x.shape[0]
        raise StepsmithError(f"{what}: {n} sample(s); at least {min_n} are needed — draw more samples (--num)")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(dim=1).sum())
        raise StepsmithError(
            f"{what}: {bad} of {x.shape[0]} samples contain NaN/Inf — the sampler diverged; check the table, "
            "the solver and the model dtype"
        )
    return x.detach().cpu()


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise StepsmithError(
            f"{what_a} have shape {list(a.shape[1:])} per sample but {what_b} have {list(b.shape[1:])}; "
            "compare samples of the same size and channel count (resize the real data or pick the right model)"
        )


def _warn_few(n: int, dim: int, what: str) -> None:
    if n < dim:
        warnings.warn(
            f"{what}: {n} samples < {dim} feature dimensions; the covariance is singular and FID is strongly "
            "biased — use more samples and compare only at equal N",
            FewSamplesWarning, stacklevel=3,
        )


# --------------------------------------------------------------------------- FID / KID


class _Precomputed(nn.Module):
    """Identity 'feature network' for features that were already extracted (float64)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(torch.float64)


@dataclass
class FeatureStats:
    """Sufficient statistics of a feature cloud for FID (float64), plus the features for KID."""

    n: int
    sum: torch.Tensor        # [d] float64
    outer_sum: torch.Tensor  # [d, d] float64, Σ f fᵀ
    features: torch.Tensor | None = None  # [n, d] (kept for KID)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def cov(self) -> torch.Tensor:
        m = self.mean[None]
        return (self.outer_sum - self.n * m.T @ m) / (self.n - 1)

    @classmethod
    def from_features(cls, f: torch.Tensor, keep: bool = True) -> FeatureStats:
        f = check_features(f, "features")
        f64 = f.to(torch.float64)
        return cls(n=f.shape[0], sum=f64.sum(0), outer_sum=f64.T @ f64, features=f if keep else None)


def check_features(f: torch.Tensor, what: str, dim: int | None = None) -> torch.Tensor:
    if not isinstance(f, torch.Tensor) or f.ndim != 2:
        got = list(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise StepsmithError(f"{what}: expected features of shape [N, D], got {got}")
    if dim is not None and f.shape[1] != dim:
        raise StepsmithError(f"{what}: features have {f.shape[1]} dimensions but {dim} were expected; "
                             "were both sets made by the same feature network?")
    return check_samples(f, what)


def fid_metric(num_features: int):
    """A torchmetrics FID accumulator over precomputed float64 features.

    Real statistics can be injected with :func:`set_real_stats` (``reset()`` keeps them).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_Precomputed(num_features), reset_real_features=False)


def set_real_stats(metric, stats: FeatureStats | None) -> None:
    """Put cached real-data statistics into a torchmetrics FID metric (``None``: zeros)."""
    d = metric.real_features_sum.shape[0]
    if stats is None:
        metric.real_features_sum = torch.zeros(d, dtype=torch.float64)
        metric.real_features_cov_sum = torch.zeros(d, d, dtype=torch.float64)
        metric.real_features_num_samples = torch.tensor(0).long()
        return
    if stats.dim != d:
        raise StepsmithError(f"real statistics have {stats.dim} dimensions but the feature network gives {d}")
    metric.real_features_sum = stats.sum.clone().to(torch.float64)
    metric.real_features_cov_sum = stats.outer_sum.clone().to(torch.float64)
    metric.real_features_num_samples = torch.tensor(int(stats.n)).long()


def _distributed() -> bool:
    """True in a multi-process run (torchmetrics then sums the FID states across processes)."""
    from schedules.distributed import current_dist

    return current_dist().world > 1


def fid_from_metric(metric) -> float:
    """``metric.compute()`` in float64 with clear errors; sums are gathered across processes
    first when torch.distributed is initialised (``accelerate launch``)."""
    if not _distributed():
        n_real, n_fake = int(metric.real_features_num_samples), int(metric.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise StepsmithError(f"FID needs at least 2 samples a side (real {n_real}, generated {n_fake})")
    metric.orig_dtype = torch.float64
    metric._update_count = max(metric._update_count, 1)
    try:
        value = metric.compute()
    except RuntimeError as exc:
        raise StepsmithError(f"FID failed: {exc}") from None
    return float(value)


def fid_from_features(real: torch.Tensor | FeatureStats, fake: torch.Tensor | FeatureStats) -> float:
    """FID between two feature sets [N, D] (or their :class:`FeatureStats`), via torchmetrics."""
    rs = real if isinstance(real, FeatureStats) else FeatureStats.from_features(check_features(real, "real features"))
    fs = fake if isinstance(fake, FeatureStats) else FeatureStats.from_features(check_features(fake, "generated features"))
    if rs.dim != fs.dim:
        raise StepsmithError(f"real features have {rs.dim} dimensions but generated ones {fs.dim}")
    for st, what in ((rs, "real"), (fs, "generated")):
        if st.n < 2:
            raise StepsmithError(f"FID needs at least 2 {what} samples, got {st.n}")
        _warn_few(st.n, st.dim, f"FID ({what})")
    m = fid_metric(rs.dim)
    set_real_stats(m, rs)
    m.fake_features_sum = fs.sum.clone()
    m.fake_features_cov_sum = fs.outer_sum.clone()
    m.fake_features_num_samples = torch.tensor(int(fs.n)).long()
    return fid_from_metric(m)


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
                      degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                      seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) between feature sets [N, D], via torchmetrics.

    ``subset_size`` is capped at the smaller set; subsets are drawn from ``seed`` so the
    value is reproducible. With ``subset_size`` equal to both N, every subset is the whole
    set and the mean is the unbiased MMD² of the full sets.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real = check_features(real, "real features").to(torch.float64)
    fake = check_features(fake, "generated features", dim=real.shape[1]).to(torch.float64)
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        m = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                    degree=degree, gamma=gamma, coef=float(coef))
    m.update(real, real=True)
    m.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


@torch.no_grad()
def extract_features(net: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Run a feature network over images in batches; returns float64 features [N, D]."""
    x = check_samples(x, "images", min_n=1)
    out = [net(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).to(torch.float64)


def fid(real: torch.Tensor, fake: torch.Tensor, net: nn.Module, batch_size: int = 256) -> float:
    """FID between two image sets [N, C, H, W] under feature network ``net``."""
    real = check_samples(real, "real images")
    fake = check_samples(fake, "generated images")
    check_same_shape(real, fake, "real images", "generated images")
    return fid_from_features(extract_features(net, real, batch_size), extract_features(net, fake, batch_size))


def kid(real: torch.Tensor, fake: torch.Tensor, net: nn.Module, batch_size: int = 256, **kwargs) -> tuple[float, float]:
    """KID (mean, std) between two image sets under feature network ``net``."""
    real = check_samples(real, "real images")
    fake = check_samples(fake, "generated images")
    check_same_shape(real, fake, "real images", "generated images")
    return kid_from_features(extract_features(net, real, batch_size), extract_features(net, fake, batch_size), **kwargs)


# --------------------------------------------------------------------------- low-dimensional


def _flat64(x: torch.Tensor, what: str) -> torch.Tensor:
    x = check_samples(x, what)
    return x.reshape(x.shape[0], -1).to(torch.float64)


def wasserstein(x: torch.Tensor, y: torch.Tensor, p: int = 2) -> float:
    """Exact p-Wasserstein distance between two empirical distributions (POT ``ot.emd2``).

    Uniform weights, Euclidean ground metric: W_p = (min_π Σ π_ij ||x_i - y_j||^p)^(1/p).
    Cost O(N·M) memory; fine up to a few thousand points.
    """
    import ot

    a, b = _flat64(x, "samples"), _flat64(y, "reference samples")
    check_same_shape(a, b, "samples", "reference samples")
    cost = torch.cdist(a, b).pow(p).numpy()
    wa = torch.full((a.shape[0],), 1.0 / a.shape[0], dtype=torch.float64).numpy()
    wb = torch.full((b.shape[0],), 1.0 / b.shape[0], dtype=torch.float64).numpy()
    value, log = ot.emd2(wa, wb, cost, numItermax=50_000_000, log=True)
    if log.get("warning"):
        raise StepsmithError(f"exact Wasserstein did not converge ({log['warning']}); use fewer samples")
    return float(max(value, 0.0)) ** (1.0 / p)


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """Median pairwise distance of the pooled samples (the usual RBF bandwidth heuristic)."""
    z = torch.cat([_flat64(x, "samples"), _flat64(y, "reference samples")])
    d = torch.pdist(z)
    return float(d.median()) if d.numel() else 1.0


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD² with k(a, b) = exp(-||a - b||² / (2 h²)); h defaults to the median distance."""
    a, b = _flat64(x, "samples"), _flat64(y, "reference samples")
    check_same_shape(a, b, "samples", "reference samples")
    h = bandwidth if bandwidth is not None else median_bandwidth(a, b)
    if not h > 0:
        raise StepsmithError(f"MMD bandwidth must be positive, got {h}")
    k = lambda u, v: torch.exp(-torch.cdist(u, v).pow(2) / (2 * h * h))  # noqa: E731
    n, m = a.shape[0], b.shape[0]
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def energy_distance(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True) -> float:
    """Energy distance D² = 2E||X-Y|| - E||X-X'|| - E||Y-Y'||.

    ``unbiased`` excludes the zero diagonal from the within-set means (U-statistics);
    ``False`` gives the V-statistic (``scipy.stats.energy_distance`` squared, in 1-D).
    """
    a, b = _flat64(x, "samples"), _flat64(y, "reference samples")
    check_same_shape(a, b, "samples", "reference samples")
    n, m = a.shape[0], b.shape[0]
    dxx, dyy = torch.cdist(a, a).sum(), torch.cdist(b, b).sum()
    if unbiased:
        xx, yy = dxx / (n * (n - 1)), dyy / (m * (m - 1))
    else:
        xx, yy = dxx / (n * n), dyy / (m * m)
    return float(2 * torch.cdist(a, b).mean() - xx - yy)


def lowdim_metrics(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All three low-dimensional distances at once."""
    return {"wasserstein": wasserstein(x, y), "mmd": mmd_rbf(x, y), "energy": energy_distance(x, y)}


# --------------------------------------------------------------------------- trajectories


@torch.no_grad()
def flow_straightness(denoiser, noise: torch.Tensor, sigmas: Sequence[float] | None = None, *,
                      steps: int = 100, solver: str = "euler") -> float:
    """Liu et al.'s straightness S = E ∫₀¹ ||(Z1 - Z0) - Ż_t||² dt of a flow model (0 = straight).

    Z runs from noise (Z0 = ``noise``, σ=1) to data (Z1, the end of the same trajectory)
    with t = 1 - σ, so Ż_t = -dx/dσ = -(x - D(x, σ))/σ (the FlowMatch velocity, negated).
    The integral is a left Riemann sum over the nodes of the solver trajectory on
    ``sigmas`` (default: ``steps`` uniform Euler steps). ||·||² sums over the sample's
    dimensions; the expectation is the mean over samples.
    """
    from schedules.solvers import check_sigmas, sample

    conv = denoiser.convention
    if conv.name != "flow":
        raise StepsmithError("flow straightness is defined for flow-matching models (σ ∈ [0, 1]); this model is "
                             f"{conv.name}")
    s = check_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist() if sigmas is None else sigmas)
    if abs(s[0] - 1.0) > 1e-9:
        raise StepsmithError(f"straightness needs a trajectory that starts at pure noise (σ=1), got σ={s[0]:g}")
    noise = check_samples(noise, "noise", min_n=1).to(noise.device)
    vel: list[tuple[int, torch.Tensor]] = []

    def grab(i: int, si: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        vel.append((i, ((x - x0) / si).to(torch.float64)))  # dx/dσ

    z1 = sample(denoiser, noise, s, solver, callback=grab).to(torch.float64)
    chord = (z1 - noise.to(torch.float64)).flatten(1)
    total = torch.zeros(noise.shape[0], dtype=torch.float64)
    for i, v in vel:
        dt = s[i] - s[i + 1]
        total += dt * (chord + v.flatten(1)).pow(2).sum(1).cpu()
    return float(total.mean())


def fidelity_from_squared_error(se: float, n: int, dim: int, data_range: float = 2.0) -> dict[str, float]:
    """Teacher-fidelity numbers from ``se``, the squared error summed over ``n`` coupled pairs of ``dim``
    elements each: ``mse``, ``rmse`` (per element), ``l2`` (root-mean-square per-sample L2) and ``psnr``
    (see the module docstring for the names)."""
    mse = se / (n * dim)
    psnr = math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
    return {"mse": mse, "rmse": math.sqrt(mse), "l2": math.sqrt(se / n), "psnr": psnr}


def teacher_fidelity(samples: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """Coupled-noise error to the reference sampler: ``samples[i]`` and ``reference[i]``
    must come from the same noise. Returns ``mse`` (mean over all elements), ``rmse`` (its root,
    per element), ``l2`` (root-mean-square per-sample L2 distance) and ``psnr`` (dB, peak-to-peak
    ``data_range``; 2 for images in [-1, 1])."""
    a = check_samples(samples, "samples", min_n=1).to(torch.float64)
    b = check_samples(reference, "reference samples", min_n=1).to(torch.float64)
    if a.shape != b.shape:
        raise StepsmithError(f"teacher fidelity pairs samples from the same noises: shapes {list(a.shape)} and "
                             f"{list(b.shape)} differ — draw both from the same noise tensor")
    return fidelity_from_squared_error(float((a - b).pow(2).sum()), a.shape[0], a[0].numel(), data_range)
