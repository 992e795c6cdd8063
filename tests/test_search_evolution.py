"""Evolutionary search: genomes always valid, determinism, resume after a kill gives the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules.io import StepsmithError
from schedules.search import make_table
from schedules.search.evolution import crossover, evolve, is_valid, mutate, random_genome, snap_genome
from schedules.search.toys import gaussian_adapter


@st.composite
def setting(draw):
    n = draw(st.integers(2, 60))
    K = draw(st.integers(1, n))
    fix = draw(st.booleans()) and K >= 1
    seed = draw(st.integers(0, 2**31))
    return n, K, fix, seed


@settings(max_examples=300, deadline=None)
@given(setting(), st.floats(0.0, 1.0))
def test_operators_keep_genomes_valid(cfg, p):
    n, K, fix, seed = cfg
    rng = np.random.default_rng(seed)
    a = random_genome(rng, K, n, fix)
    b = random_genome(rng, K, n, fix)
    for g in (a, b, mutate(rng, a, n, p, fix), crossover(rng, a, b, n, fix),
              mutate(rng, crossover(rng, a, b, n, fix), n, p, fix)):
        assert is_valid(g, K, n), (g, K, n)
        if fix:
            assert g[0] == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=15), st.integers(15, 40), st.booleans())
def test_snapped_baselines_are_valid(sig, n, fix):
    grid = np.linspace(1, 0, n + 1).tolist()
    sigmas = sorted(sig, reverse=True) + [0.0]
    g = snap_genome(grid, sigmas, n, fix)
    assert is_valid(g, len(sig), n)


def test_evolve_finds_optimum_of_separable_fitness():
    target = (0, 7, 13, 20)

    def f(g):
        return float(sum((a - b) ** 2 for a, b in zip(g, target)))

    best, val, _ = evolve(f, 4, 30, seed=1, population=16, generations=25, fix_start=True)
    assert val <= 2.0  # within a step or two of the optimum after 25 generations


def test_resume_after_kill_gives_same_result(tmp_path):
    ad = gaussian_adapter("vp", 0.5, dim=3)
    opts = dict(samples=4, grid=20, population=6, generations=4, elite=2)
    full = make_table(ad, "evolution", 4, "ddim", **opts)
    ck = tmp_path / "evo.json"

    class Killed(Exception):
        pass

    def kill_at_2(gen):
        if gen == 1:
            raise Killed

    with pytest.raises(Killed):
        make_table(ad, "evolution", 4, "ddim", checkpoint=str(ck), on_generation=kill_at_2, **opts)
    assert ck.is_file()
    resumed = make_table(ad, "evolution", 4, "ddim", checkpoint=str(ck), **opts)
    assert resumed.sigmas == full.sigmas and resumed.objective == full.objective
    # a checkpoint from another search is refused
    with pytest.raises(StepsmithError, match="another search"):
        make_table(ad, "evolution", 5, "ddim", checkpoint=str(ck), **opts)


def test_a_checkpoint_holds_only_for_its_conditioning_and_data(tmp_path, monkeypatch):
    """Its fitness values were measured under one guidance (and, for a data objective, one data set): a search
    at another guidance or on other data refuses the checkpoint instead of resuming from stale fitness values."""
    from schedules import load_model
    from schedules.conditioning import Conditioning
    from schedules.search import objectives

    opts = dict(samples=4, grid=20, population=4, generations=1, elite=2)
    ck = tmp_path / "cond.json"
    at = {w: load_model("builtin:digits-cond", conditioning=Conditioning(labels="all", guidance=w)) for w in (2.0, 3.0)}
    first = make_table(at[2.0], "evolution", 4, "euler", checkpoint=str(ck), **opts)
    assert make_table(at[2.0], "evolution", 4, "euler", checkpoint=str(ck), **opts).objective == first.objective
    with pytest.raises(StepsmithError, match="another search"):
        make_table(at[3.0], "evolution", 4, "euler", checkpoint=str(ck), **opts)

    monkeypatch.setattr(objectives, "_USER_DATA", {})
    ad = gaussian_adapter("flow", 0.3, dim=2)
    ck = tmp_path / "data.json"
    objectives.register_data(ad.name, torch.randn(64, 2, generator=torch.Generator().manual_seed(1)))
    make_table(ad, "evolution", 4, "euler", objective="data-wasserstein", checkpoint=str(ck), **opts)
    objectives.register_data(ad.name, torch.randn(64, 2, generator=torch.Generator().manual_seed(2)) + 1)
    with pytest.raises(StepsmithError, match="another search"):
        make_table(ad, "evolution", 4, "euler", objective="data-wasserstein", checkpoint=str(ck), **opts)


def test_evolution_table_deterministic_and_valid():
    ad = gaussian_adapter("flow", 0.3, mean=0.5, dim=3)
    a = make_table(ad, "evolution", 4, "euler", samples=4, grid=20, population=6, generations=3, seed=3)
    b = make_table(ad, "evolution", 4, "euler", samples=4, grid=20, population=6, generations=3, seed=3)
    assert a.sigmas == b.sigmas and a.objective == b.objective
    assert len(set(a.sigmas)) == len(a.sigmas)
    pinned = make_table(ad, "evolution", 4, "euler", samples=4, grid=20, population=6, generations=2, seed=3,
                        fix_start=True)
    assert pinned.sigmas[0] == 1.0
    # the initial population contains the baselines, so the result is at least as good as each of them
    assert a.provenance["genomes_evaluated"] >= 6


def test_custom_fitness_is_used():
    ad = gaussian_adapter("flow", 0.3, dim=2)
    def fit(sig):
        return abs(sig[1] - 0.5) + abs(sig[2] - 0.25)

    t = make_table(ad, "evolution", 3, "euler", grid=20, population=12, generations=12, fitness=fit)
    assert t.objective == pytest.approx(fit(t.sigmas))
    assert t.objective <= 0.1 and t.provenance["objective_kind"] == "custom fitness"
