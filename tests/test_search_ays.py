"""Align Your Steps optimizer: the KLUB estimator against quadrature, the optimizer against the exact optimum."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import minimize

from schedules.search import make_table
from schedules.search.ays import KLUB, coordinate_descent, subdivide
from schedules.search.toys import gaussian_adapter

C = 0.5  # data std of the Gaussian toy


def exact_interval(lo, hi, c=C):
    """KLUB term for x0 ~ N(0, c²) per dimension: ∫ t⁻³ c⁴ (1/(c²+t²) − 1/(c²+t_hi²)) dt (Brownian coupling)."""
    return quad(lambda t: t**-3 * c**4 * (1 / (c * c + t * t) - 1 / (c * c + hi * hi)), lo, hi, limit=200)[0]


def test_klub_estimator_matches_quadrature():
    ad = gaussian_adapter("vp", C, dim=64)
    g = torch.Generator().manual_seed(0)
    x0 = C * torch.randn(256, 64, generator=g)
    k = KLUB(ad, x0, draws=8, seed=0)
    for lo, hi in [(0.05, 0.2), (0.2, 1.0), (1.0, 10.0)]:
        est = k.interval(lo, hi) / 64  # the estimator sums over dimensions
        assert est == pytest.approx(exact_interval(lo, hi), rel=0.08)


def test_optimizer_reaches_exact_klub_optimum():
    ad = gaussian_adapter("vp", C, dim=32)
    x0 = C * torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
    k = KLUB(ad, x0, draws=4, seed=1)
    tmin, tmax = 0.02, 20.0
    ts, _ = coordinate_descent(k, [tmax, 2.0, 0.5, tmin], [1, 2], candidates=31, max_sweeps=12)

    def total(z):
        pts = [tmax, *sorted(math.exp(v) for v in z)[::-1], tmin]
        if any(a <= b for a, b in zip(pts, pts[1:])):
            return 1e9
        return sum(exact_interval(pts[i + 1], pts[i]) for i in range(3))

    opt = minimize(total, [math.log(1.0), math.log(0.1)], method="Nelder-Mead", options={"xatol": 1e-4}).x
    want = sorted((math.exp(v) for v in opt), reverse=True)
    for got, w in zip(ts[1:3], want):
        assert abs(math.log(got / w)) < 0.25, (ts, want)
    # and the KLUB really went down from the start
    assert k.total(ts) < k.total([tmax, 2.0, 0.5, tmin])


def test_subdivide_inserts_log_midpoints():
    ts, new = subdivide([16.0, 4.0, 1.0])
    assert ts == pytest.approx([16.0, 8.0, 4.0, 2.0, 1.0]) and new == [1, 3]


@pytest.mark.parametrize("conv,solver", [("flow", "euler"), ("vp", "ddim"), ("vp", "dpmpp-2m")])
def test_ays_tables_valid_and_deterministic(conv, solver):
    ad = gaussian_adapter(conv, C, mean=0.2, dim=4)
    kw = dict(samples=8, draws=1, candidates=5, max_sweeps=2, teacher_steps=20)
    a = make_table(ad, "ays", 4, solver, **kw)
    b = make_table(ad, "ays", 4, solver, **kw)
    assert a.sigmas == b.sigmas and a.method == "ays"
    assert a.provenance["x0_source"].startswith("teacher outputs")
    if conv == "vp":
        assert all(float(v).is_integer() for v in a.timesteps)
    else:
        assert a.sigmas[0] == 1.0
    # hierarchical path: optimise 3 points, subdivide, interpolate to 7 steps
    h = make_table(ad, "ays", 7, solver, base=3, **kw)
    assert h.steps == 7
