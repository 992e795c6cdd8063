"""Manifold metrics of a generated feature cloud against a real one: improved precision and
recall (Kynkäänniemi et al., 2019) and density and coverage (Naeem et al., 2020).

Each real point ``x_i`` gets a ball whose radius is the distance to its k-th nearest
*other* real point, NND_k(x_i); the generated points get balls the same way.

* precision — fraction of generated points inside at least one real ball (fidelity);
* recall — fraction of real points inside at least one generated ball (diversity);
* density — (1 / kM) Σ_j Σ_i 1[y_j ∈ B(x_i, NND_k(x_i))]: how many real balls hold a
  generated point on average, divided by k (≈ 1 when both sets share a distribution;
  it can exceed 1);
* coverage — fraction of real points whose ball holds at least one generated point.

Balls are closed (distance ≤ radius). Duplicate points count as neighbours at distance 0.
Precision and recall use ``k=3`` by default and density and coverage ``k_density=5``, the
values of the two papers. Like FID, all four depend on N: compare at equal sample counts.

Distances are float64 and computed by ``torch.cdist`` over row chunks, so memory stays
bounded (about ``chunk × N`` doubles at a time; 10k × 10k features need ~64 MB a chunk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from schedules.io import StepsmithError

CHUNK_BYTES = 64 * 2**20  # budget for one block of the distance matrix


@dataclass(frozen=True)
class ManifoldMetrics:
    """Precision, recall, density and coverage, with the settings that produced them."""

    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    k_density: int
    n_real: int
    n_fake: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def check_feature_sets(real, fake) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as float64 CPU tensors [N, D] with the same D and finite values."""
    out = []
    for f, what in ((real, "real features"), (fake, "generated features")):
        if isinstance(f, np.ndarray):
            f = torch.from_numpy(f)
        if not isinstance(f, torch.Tensor) or f.ndim != 2:
            got = list(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise StepsmithError(f"{what}: expected features of shape [N, D], got {got}")
        f = f.detach().cpu().to(torch.float64)
        if not torch.isfinite(f).all():
            bad = int((~torch.isfinite(f)).any(dim=1).sum())
            raise StepsmithError(f"{what}: {bad} of {f.shape[0]} rows contain NaN/Inf — the sampler or the feature "
                                 "network diverged")
        out.append(f)
    if out[0].shape[1] != out[1].shape[1]:
        raise StepsmithError(f"real features have {out[0].shape[1]} dimensions but generated ones {out[1].shape[1]}; "
                             "were both sets made by the same feature network?")
    return out[0], out[1]


def _check_k(n: int, k: int, what: str, name: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise StepsmithError(f"{name} must be a positive integer, got {k!r}")
    if n <= k:
        raise StepsmithError(f"{what}: {n} sample(s) but {name}={k} nearest neighbours need at least {k + 1} — "
                             "draw more samples (--num) or lower k")


def rows_per_chunk(n_cols: int, chunk_size: int | None = None) -> int:
    """Rows of a distance block: ``chunk_size`` if given, else what fits :data:`CHUNK_BYTES`."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise StepsmithError(f"chunk_size must be at least 1, got {chunk_size}")
        return int(chunk_size)
    return max(1, CHUNK_BYTES // (8 * max(n_cols, 1)))


def knn_radii(x: torch.Tensor, ks: tuple[int, ...], chunk_size: int | None = None) -> dict[int, torch.Tensor]:
    """Distance of each row of ``x`` to its k-th nearest other row, for every k in ``ks``.

    One pass over row chunks; the diagonal (a point to itself) is excluded.
    """
    n, k_max = x.shape[0], max(ks)
    step = rows_per_chunk(n, chunk_size)
    kth = {k: torch.empty(n, dtype=torch.float64) for k in ks}
    for i0 in range(0, n, step):
        d = torch.cdist(x[i0:i0 + step], x)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i0] = torch.inf
        nearest = torch.topk(d, k_max, dim=1, largest=False, sorted=True).values
        for k in ks:
            kth[k][i0:i0 + step] = nearest[:, k - 1]
    return kth


def manifold_metrics(real, fake, *, k: int = 3, k_density: int = 5,
                     chunk_size: int | None = None) -> ManifoldMetrics:
    """Precision, recall (k-NN radius ``k``), density and coverage (``k_density``) of
    generated features ``fake`` [M, D] against real features ``real`` [N, D].

    Raises :class:`StepsmithError` for non-2-D input, mismatched D, NaN/Inf, or too few
    samples (N must exceed ``max(k, k_density)``, M must exceed ``k``).
    ``chunk_size`` rows of a distance block (default: a ~64 MB block).
    """
    real, fake = check_feature_sets(real, fake)
    _check_k(real.shape[0], k, "real features", "k")
    _check_k(real.shape[0], k_density, "real features", "k_density")
    _check_k(fake.shape[0], k, "generated features", "k")
    r_real = knn_radii(real, tuple(sorted({k, k_density})), chunk_size)
    r_fake = knn_radii(fake, (k,), chunk_size)[k]
    n, m = real.shape[0], fake.shape[0]
    precise, balls_hit = 0, 0
    recalled = torch.zeros(n, dtype=torch.bool)
    nearest_fake = torch.full((n,), torch.inf, dtype=torch.float64)
    step = rows_per_chunk(n, chunk_size)
    for j0 in range(0, m, step):
        d = torch.cdist(fake[j0:j0 + step], real)  # [chunk of fake, all real]
        precise += int((d <= r_real[k][None]).any(dim=1).sum())
        balls_hit += int((d <= r_real[k_density][None]).sum())
        recalled |= (d <= r_fake[j0:j0 + step, None]).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
    return ManifoldMetrics(
        precision=precise / m,
        recall=float(recalled.double().mean()),
        density=balls_hit / (k_density * m),
        coverage=float((nearest_fake <= r_real[k_density]).double().mean()),
        k=k, k_density=k_density, n_real=n, n_fake=m,
    )
