"""Align Your Steps optimizer: the KLUB estimator against quadrature, the optimizer against the exact optimum,
data handling (data samples, not teacher samples) and the final point replaced by 0."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import minimize

from schedules.baselines import ays_closed_form_nodes
from schedules.cli import main
from schedules.io import StepsmithError, save_safetensors
from schedules.search import make_table
from schedules.search.ays import (
    KLUB,
    GaussianODEError,
    ays_table,
    ays_tables,
    coordinate_descent,
    data_samples,
    init_nodes,
    sample_t,
    subdivide,
)
from schedules.search.toys import gaussian_adapter

C = 0.5  # data std of the Gaussian toy


def exact_interval(lo, hi, c=C):
    """KLUB term for x0 ~ N(0, c²) per dimension: ∫ t⁻³ c⁴ (1/(c²+t²) − 1/(c²+t_hi²)) dt (Brownian coupling)."""
    b = 0.0 if math.isinf(hi) else 1 / (c * c + hi * hi)
    return quad(lambda t: t**-3 * c**4 * (1 / (c * c + t * t) - b), lo, hi, limit=200)[0]


@pytest.mark.parametrize("c", [0.5, 2.0, 0.1])
def test_klub_estimator_matches_quadrature_for_any_importance_constant(c):
    ad = gaussian_adapter("vp", C, dim=64)
    x0 = C * torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    k = KLUB(ad, x0, draws=8, seed=0, c=c)
    for lo, hi in [(0.05, 0.2), (0.2, 1.0), (1.0, 10.0)]:
        est = k.interval(lo, hi) / 64  # the estimator sums over dimensions
        assert est == pytest.approx(exact_interval(lo, hi), rel=0.1), (c, lo, hi)


def test_klub_estimator_flow_interval_to_infinity():
    ad = gaussian_adapter("flow", C, dim=64)
    x0 = C * torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    k = KLUB(ad, x0, draws=8, seed=2)
    assert k.interval(2.0, math.inf) / 64 == pytest.approx(exact_interval(2.0, math.inf), rel=0.1)


def test_importance_sampling_follows_the_gaussian_density():
    """t ~ q(t) ∝ t⁻³ (1/(t²+c²) − 1/(t_hi²+c²)): the empirical CDF matches the quadrature CDF."""
    lo, hi, c = 0.1, 5.0, 0.5
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, Z = sample_t(u, lo, hi, c)
    assert Z == pytest.approx(exact_interval(lo, hi, c) / c**4, rel=1e-6)
    assert float(t.min()) >= lo and float(t.max()) <= hi
    for q in (0.2, 0.5, 1.0):
        want = exact_interval(lo, q, c) / c**4 - quad(lambda s, q=q: s**-3 * (1 / (c * c + hi * hi) - 1 / (c * c + q * q)),
                                                     lo, q)[0]
        assert float((t < q).double().mean()) == pytest.approx(want / Z, abs=0.015)


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


def test_initialisation_uniform_by_default_and_rho7_on_request():
    vp = gaussian_adapter("vp", C)
    conv = vp.convention
    ts = init_nodes(vp, 5)
    assert conv.model_time(torch.tensor(ts)).tolist() == pytest.approx([999, 749.25, 499.5, 249.75, 0], abs=1e-6)
    fl = gaussian_adapter("flow", C)
    lo, hi = fl.convention.sampling_range()
    to_native = fl.convention.from_edm
    native = to_native(torch.tensor(init_nodes(fl, 4, "rho7"), dtype=torch.float64)).tolist()
    want = [(hi ** (1 / 7) + r * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7 for r in (0, 1 / 3, 2 / 3, 1)]
    assert native == pytest.approx(want, rel=1e-9)
    uni = to_native(torch.tensor(init_nodes(fl, 4), dtype=torch.float64)).tolist()  # auto: uniform in σ down to 0
    assert uni == pytest.approx([hi, 2 * hi / 3, hi / 3, lo], rel=1e-9)  # ... the end point kept at σ_min
    with pytest.raises(StepsmithError, match="init must be one of") as e:
        init_nodes(fl, 4, "cosine")
    assert e.value.param == "init"


def test_euler_step_shrinks_the_gaussian_std_by_cos_of_the_atan_gap():
    """The derivation behind Theorem 3.1: Euler/DDIM on N(0, c²) data ends with std Π cos Δθ times the true one."""
    c, ts = 0.7, [30.0, 4.0, 1.3, 0.4, 0.05]
    std = math.sqrt(c * c + ts[0] ** 2)
    for a, b in zip(ts, ts[1:]):  # x ← x + (b − a)·(x − D(x, a))/a with D(x, t) = c²/(c²+t²)·x, on the std
        std *= 1 + (b - a) * (1 - c * c / (c * c + a * a)) / a
    ratio = std / math.sqrt(c * c + ts[-1] ** 2)
    assert ratio < 0.99
    assert -math.log(ratio) == pytest.approx(GaussianODEError(c).total(ts), rel=1e-12)


@pytest.mark.parametrize("tmax,n", [(20.0, 4), (80.0, 5), (math.inf, 4)])
def test_optimizer_reaches_the_closed_form_on_gaussian_data(tmax, n):
    """coordinate_descent on Theorem 3.1's objective lands on ays_closed_form_nodes (to the candidate grid)."""
    tmin = 0.02
    start = [tmax, *(2.0 * 0.3 ** k for k in range(n - 2)), tmin]
    obj = GaussianODEError(C)
    ts, _ = coordinate_descent(obj, start, list(range(1, n - 1)), candidates=101, max_sweeps=60)
    want = ays_closed_form_nodes(tmin, tmax, n, C)
    for got, w in zip(ts[1:-1], want[1:-1]):
        assert abs(math.log(got / w)) < 0.06, (ts, want)
    assert obj.total(ts) < obj.total(start)


def test_klub_optimum_is_not_the_closed_form():
    """The SDE KLUB (weight 1/t³) puts its interior points far below the closed form (ODE output) optimum."""
    tmin, tmax = 0.002, 80.0

    def total(z):
        pts = [tmax, *sorted((math.exp(v) for v in z), reverse=True), tmin]
        return sum(exact_interval(pts[i + 1], pts[i]) for i in range(3))

    want = ays_closed_form_nodes(tmin, tmax, 4, C)
    opt = minimize(total, [math.log(want[1]), math.log(want[2])], method="Nelder-Mead", options={"xatol": 1e-6}).x
    got = sorted((math.exp(v) for v in opt), reverse=True)
    assert total(opt) < total([math.log(want[1]), math.log(want[2])])
    assert all(g < w / 3 for g, w in zip(got, want[1:3])), (got, want)


def _data(n, dim=4, mean=0.2):
    return C * torch.randn(n, dim, generator=torch.Generator().manual_seed(5)) + mean


@pytest.mark.parametrize("conv,solver", [("flow", "euler"), ("vp", "ddim"), ("vp", "dpmpp-2m")])
def test_ays_tables_valid_deterministic_and_every_evaluation_counts(conv, solver):
    ad = gaussian_adapter(conv, C, mean=0.2, dim=4)
    kw = dict(samples=8, draws=1, candidates=5, max_sweeps=2, teacher_steps=20, data=_data(50))
    a = make_table(ad, "ays", 4, solver, **kw)
    b = make_table(ad, "ays", 4, solver, **kw)
    assert a.sigmas == b.sigmas and a.method == "ays"
    assert a.provenance["x0_source"].startswith("data tensor: 8 of 50")
    lo = ad.convention.sampling_range()[0]
    assert a.sigmas[-1] == 0.0 and a.sigmas[-2] > 1.5 * lo  # last="zero": no evaluation spent at σ_min
    if conv == "vp":
        assert all(float(v).is_integer() for v in a.timesteps)
        s = make_table(ad, "ays", 4, solver, last="sigma_min", **kw)
        assert s.sigmas[-2] == pytest.approx(lo)  # the published lists' last evaluated node
    else:
        assert a.sigmas[0] == 1.0
    # hierarchical path: optimise 3 points, subdivide, interpolate to 7 steps
    h = make_table(ad, "ays", 7, solver, base=3, **kw)
    assert h.steps == 7


def test_data_changes_the_klub_and_teacher_is_a_labelled_fallback():
    ad = gaussian_adapter("vp", C, mean=0.2, dim=4)
    kw = dict(samples=8, draws=1, candidates=5, max_sweeps=2, teacher_steps=20)
    with pytest.warns(UserWarning, match="no data samples for the KLUB: it used the teacher's own outputs"):
        fb = make_table(ad, "ays", 4, "ddim", **kw)  # a toy has no data: the teacher fallback, labelled and warned
    assert "teacher outputs" in fb.provenance["x0_source"] and "fallback" in fb.provenance["x0_source"]
    far = make_table(ad, "ays", 4, "ddim", data=_data(20, mean=3.0), **kw)
    assert far.provenance["klub"] != pytest.approx(fb.provenance["klub"], rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for explicitly: no warning
        asked = make_table(ad, "ays", 4, "ddim", x0="teacher", **kw)
    assert asked.sigmas == fb.sigmas
    with pytest.raises(StepsmithError, match="x0=teacher ignores"):
        make_table(ad, "ays", 4, "ddim", x0="teacher", data=_data(20), **kw)
    with pytest.raises(StepsmithError, match="needs data samples"):
        make_table(ad, "ays", 4, "ddim", x0="data", **kw)


def test_bad_data_refused():
    ad = gaussian_adapter("vp", C, dim=4)
    with pytest.raises(StepsmithError, match="shape") as e:
        data_samples(ad, torch.zeros(20, 3), 8, 0)
    assert e.value.param == "data"
    with pytest.raises(StepsmithError, match="holds 5 samples but the search asks for 8"):
        data_samples(ad, torch.zeros(5, 4), 8, 0)


def test_embedded_models_default_to_their_data():
    from schedules import load_model

    ad = load_model("builtin:toy2d-flow")
    x, src = data_samples(ad, None, 16, 0)
    assert x.shape == (16, 2) and src.startswith("toy2d_data")


@pytest.mark.parametrize("n,shape,match", [(100, (3,), "shape"), (4, (2,), "holds 4 samples")])
def test_cli_bad_data_exit_2_nothing_written(tmp_path, capsys, n, shape, match):
    f = tmp_path / "data.safetensors"
    save_safetensors(f, {"x": torch.zeros(n, *shape)})
    out = tmp_path / "t.json"
    rc = main(["search", "--model", "builtin:toy2d-flow", "--method", "ays", "--nfe", "4", "--samples", "8",
               "--data", str(f), "--no-progress", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert match in capsys.readouterr().err


def test_cli_data_only_with_ays(tmp_path, capsys):
    rc = main(["search", "--model", "builtin:toy2d-flow", "--method", "uniform", "--nfe", "4",
               "--data", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "t.json")])
    assert rc == 2 and "--data goes with --method ays" in capsys.readouterr().err


def test_one_search_serves_every_budget_and_options_are_checked():
    ad = gaussian_adapter("vp", C, mean=0.2, dim=4)
    kw = dict(samples=8, draws=1, candidates=3, max_sweeps=1, teacher_steps=10, data=_data(20), base=5, levels=1)
    many = ays_tables(ad, [3, 5], "ddim", **kw)
    assert [t.steps for t in many] == [3, 5]
    assert ays_table(ad, 3, "ddim", **kw).sigmas == many[0].sigmas
    assert many[0].provenance["early_stop_metric"]["objective"] == "teacher-mse"  # a toy has no feature network
    with pytest.raises(StepsmithError, match="does not take"):
        make_table(ad, "ays", 4, "ddim", bogus=1)


def test_flow_interpolation_does_not_pin_the_second_node():
    """Log-linear interpolation in native σ for flow: the 41-point uniform list → 5 points stays uniform (σ = 1 on top
    is EDM ∞, which the EDM rule would keep while pinning the next node at the 41-point list's 0.975)."""
    from schedules.search.ays import _to_count

    fl = gaussian_adapter("flow", C)
    conv = fl.convention
    lo, hi = conv.sampling_range()
    out = conv.from_edm(torch.tensor(_to_count(init_nodes(fl, 41), 5, conv), dtype=torch.float64)).tolist()
    assert out == pytest.approx([hi, 0.75 * hi, 0.5 * hi, 0.25 * hi, lo], rel=1e-5)
    pinned = conv.from_edm(torch.tensor(_to_count(init_nodes(fl, 41), 5), dtype=torch.float64)).tolist()
    assert pinned[1] > 0.95  # what the EDM-space rule would do


def test_cli_prints_the_fallback_warning_as_one_stepsmith_line(tmp_path, capsys):
    f = tmp_path / "m.py"  # a user's model file: no data is known for it
    f.write_text("import torch\nfrom torch import nn\n\nclass Net(nn.Module):\n    def forward(self, x, t):\n"
                 "        return 0.5 * x\n\nnet = Net()\n")
    out = tmp_path / "t.json"
    rc = main(["search", "--model", f"{f}:net", "--prediction", "flow", "--shape", "2", "--method", "ays", "--nfe", "3",
               "--samples", "4", "--option", "draws=1", "--option", "candidates=3", "--option", "max_sweeps=1",
               "--option", "teacher_steps=8", "--option", "levels=1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and out.exists()
    warned = [ln for ln in err.splitlines() if "warning:" in ln]
    assert warned == [ln for ln in warned if ln.startswith("stepsmith search: warning: no data samples for the KLUB")]
    assert len(warned) == 1 and "UserWarning" not in err
