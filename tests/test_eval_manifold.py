"""Trust tests for eval.manifold: precision/recall/density/coverage against a brute-force loop."""

import numpy as np
import pytest
import torch

from eval.manifold import knn_radii, manifold_metrics, rows_per_chunk
from schedules.io import StepsmithError


def brute_force(real: np.ndarray, fake: np.ndarray, k: int, k_density: int) -> dict[str, float]:
    """The definitions of the two papers, written as plain Python loops."""
    def dist(a, b):
        return float(np.sqrt(((a - b) ** 2).sum()))

    def radius(points, i, kk):
        others = sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)
        return others[kk - 1]

    r_real = [radius(real, i, k) for i in range(len(real))]
    r_real_d = [radius(real, i, k_density) for i in range(len(real))]
    r_fake = [radius(fake, j, k) for j in range(len(fake))]
    precision = np.mean([any(dist(y, x) <= r for x, r in zip(real, r_real)) for y in fake])
    recall = np.mean([any(dist(x, y) <= r for y, r in zip(fake, r_fake)) for x in real])
    density = sum(dist(y, x) <= r for y in fake for x, r in zip(real, r_real_d)) / (k_density * len(fake))
    coverage = np.mean([any(dist(y, x) <= r for y in fake) for x, r in zip(real, r_real_d)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("seed,k,k_density", [(0, 3, 5), (1, 2, 2), (2, 4, 3)])
def test_matches_brute_force(seed, k, k_density):
    g = np.random.default_rng(seed)
    real = g.normal(size=(41, 5))
    fake = g.normal(size=(33, 5)) * 0.8 + 0.7
    ref = brute_force(real, fake, k, k_density)
    for chunk in (None, 1, 7):
        got = manifold_metrics(torch.from_numpy(real), torch.from_numpy(fake), k=k, k_density=k_density,
                               chunk_size=chunk)
        for name, value in ref.items():
            assert getattr(got, name) == pytest.approx(value, abs=1e-12), (name, chunk)
    assert 0 < got.precision < 1 and 0 < got.recall < 1 and got.density > 0
    assert (got.k, got.k_density, got.n_real, got.n_fake) == (k, k_density, 41, 33)


def test_defaults_are_paper_values_and_as_dict():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 4, generator=g), torch.randn(25, 4, generator=g)
    d = manifold_metrics(real, fake).as_dict()
    assert (d["k"], d["k_density"]) == (3, 5)
    assert set(d) >= {"precision", "recall", "density", "coverage"}
    ref = brute_force(real.numpy(), fake.numpy(), 3, 5)
    assert d["coverage"] == pytest.approx(ref["coverage"])


def test_identical_sets_are_perfect():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = manifold_metrics(x, x.clone())
    assert m.precision == m.recall == m.coverage == 1.0
    assert m.density >= 1 / 5  # every point lies at least in its own ball


def test_far_disjoint_sets_score_zero():
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g) + 1000
    m = manifold_metrics(real, fake)
    assert (m.precision, m.recall, m.density, m.coverage) == (0.0, 0.0, 0.0, 0.0)


def test_float32_and_numpy_inputs_are_computed_in_float64():
    g = np.random.default_rng(5)
    real, fake = g.normal(size=(20, 3)), g.normal(size=(20, 3))
    a = manifold_metrics(real, fake)
    b = manifold_metrics(torch.from_numpy(real), torch.from_numpy(fake))
    assert a == b


def test_knn_radii_excludes_self_and_counts_duplicates():
    x = torch.tensor([[0.0], [0.0], [1.0], [3.0]], dtype=torch.float64)
    r = knn_radii(x, (1, 2), chunk_size=2)
    assert r[1].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert r[2].tolist() == [1.0, 1.0, 1.0, 3.0]


def test_chunk_budget_is_bounded():
    assert rows_per_chunk(10_000) * 10_000 * 8 <= 64 * 2**20
    assert rows_per_chunk(10**9) == 1
    assert rows_per_chunk(10, chunk_size=3) == 3
    with pytest.raises(StepsmithError, match="chunk_size"):
        rows_per_chunk(10, chunk_size=0)


@pytest.mark.parametrize("real,fake,match", [
    (torch.randn(5, 2), torch.randn(20, 2), "at least 6"),          # N <= k_density
    (torch.randn(20, 2), torch.randn(3, 2), "generated features: 3 sample"),  # M <= k
    (torch.randn(20, 2), torch.randn(20, 3), "dimensions"),
    (torch.randn(20), torch.randn(20, 2), r"\[N, D\]"),
    ([[0.0, 1.0]] * 20, torch.randn(20, 2), r"\[N, D\]"),
    (torch.full((20, 2), float("nan")), torch.randn(20, 2), "NaN"),
    (torch.randn(20, 2), torch.full((20, 2), float("inf")), "NaN/Inf"),
])
def test_bad_inputs_are_refused(real, fake, match):
    with pytest.raises(StepsmithError, match=match):
        manifold_metrics(real, fake)


def test_bad_k_is_refused():
    x = torch.randn(20, 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(StepsmithError, match="positive integer"):
            manifold_metrics(x, x, k=bad)
    with pytest.raises(StepsmithError, match="k_density"):
        manifold_metrics(x, x, k_density=20)
