"""Noise–data couplings: exact minibatch OT is a permutation of least cost, C²OT never pairs across classes,
OT batches are separate from the network batch, and bad settings fail before any teacher call."""

from __future__ import annotations

import itertools

import pytest
import torch

from distill.base import TeacherPairs
from distill.trainer import DistillConfig
from schedules.cli import main as cli_main
from schedules.couplings import (
    Coupling,
    cheaper_share,
    class_ot_coupling,
    condition_weight,
    continuous_c2ot_coupling,
    cosine_cost,
    ot_coupling,
    squared_cost,
)
from schedules.io import StepsmithError

torch.set_num_threads(1)


def _cost(x0, x1, perm) -> float:
    return float(squared_cost(x0, x1[perm]).diagonal().sum())


def _is_permutation(perm, n) -> bool:
    return torch.equal(torch.sort(perm).values, torch.arange(n))


@pytest.mark.parametrize("seed", range(5))
def test_ot_is_the_brute_force_optimum_on_tiny_sets(seed):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) + 1
    perm = ot_coupling(x0, x1)
    assert _is_permutation(perm, 6)
    best = min(_cost(x0, x1, torch.tensor(p)) for p in itertools.permutations(range(6)))
    assert _cost(x0, x1, perm) == pytest.approx(best, rel=1e-12)


def test_ot_permutation_keeps_every_point_and_beats_independent():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) * 0.5 + 2
    perm = ot_coupling(x0, x1)
    assert _is_permutation(perm, 300)  # no duplicates, no drops
    assert _cost(x0, x1, perm) <= _cost(x0, x1, torch.arange(300))


def test_c2ot_never_pairs_across_classes():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (200,), generator=g)
    x0, x1 = torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g) + labels[:, None].float()
    perm = class_ot_coupling(x0, x1, labels)
    assert _is_permutation(perm, 200)
    assert torch.equal(labels[perm], labels)
    assert _cost(x0, x1, perm) <= _cost(x0, x1, torch.arange(200))
    perm2 = Coupling("c2ot").permutation(x0, x1, labels)  # integer conditions are class labels
    assert torch.equal(perm, perm2)
    plain = ot_coupling(x0, x1)
    assert not torch.equal(labels[plain], labels)  # plain OT does cross classes here


def test_continuous_c2ot_weight_keeps_the_target_share_of_cheaper_pairs():
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(120, 4, generator=g)
    x0, x1 = torch.randn(120, 2, generator=g), torch.randn(120, 2, generator=g)
    m, c = squared_cost(x0, x1), cosine_cost(cond)
    w = condition_weight(m, c, 0.2)
    assert w > 0
    assert cheaper_share(m + w * c, m.diagonal()) == pytest.approx(0.2, abs=0.02)
    perm = continuous_c2ot_coupling(x0, x1, cond, 0.2)
    assert _is_permutation(perm, 120)
    # the condition term makes the pairs' conditions closer than plain OT's
    plain = ot_coupling(x0, x1)
    assert float(c[torch.arange(120), perm].mean()) < float(c[torch.arange(120), plain].mean())


def test_ot_batches_are_separate_from_the_network_batch():
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g)
    perm = Coupling("ot", ot_batch=32).couple(x0, x1)
    assert _is_permutation(perm, 100)
    for b0 in range(0, 100, 32):  # each OT batch is coupled within itself
        chunk = perm[b0:b0 + 32]
        assert int(chunk.min()) >= b0 and int(chunk.max()) < b0 + 32
    assert Coupling("ot", ot_batch=32).pool_size(50) == 64
    assert Coupling("ot").pool_size(50) == 50 and Coupling("independent", ot_batch=32).pool_size(50) == 50


def test_ot_pairs_are_reproducible_and_shorter_than_the_teacher_pairs():
    g = torch.Generator().manual_seed(4)
    noise, final = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) * 0.3 + 1.5
    pairs = TeacherPairs(noise, final, Coupling("ot", ot_batch=64))
    z0, x1 = pairs.draw(torch.Generator().manual_seed(9), 100)
    z0b, x1b = pairs.draw(torch.Generator().manual_seed(9), 100)
    assert torch.equal(z0, z0b) and torch.equal(x1, x1b) and z0.shape == (100, 2)
    zi, xi = TeacherPairs(noise, final).draw(torch.Generator().manual_seed(9), 100)
    assert float(((z0 - x1) ** 2).sum(1).mean()) < float(((zi - xi) ** 2).sum(1).mean())


@pytest.mark.parametrize("kwargs, param", [
    (dict(method="reflow", coupling="c2ot"), "coupling"),       # a class constraint on an unconditional model
    (dict(method="reflow", coupling="ot", ot_batch=0), "ot_batch"),
    (dict(method="kstep", coupling="ot", ot_batch=5000, pairs=2000), "ot_batch"),  # larger than the data
    (dict(method="boss", coupling="ot"), "coupling"),
    (dict(method="reflow", coupling="sinkhorn"), "coupling"),
])
def test_bad_coupling_settings_name_the_parameter(kwargs, param):
    with pytest.raises(StepsmithError) as exc:
        DistillConfig(**kwargs).validate()
    assert exc.value.param == param


def test_cli_coupling_flags_and_errors(tmp_path, capsys):
    from schedules.adapters import load_model
    from schedules.baselines import uniform

    uniform(load_model("builtin:toy2d-flow"), 1).save(tmp_path / "t.json")
    base = ["distill", "--model", "builtin:toy2d-flow", "--table", str(tmp_path / "t.json"), "--steps", "2",
            "--method", "reflow", "--pairs", "20", "--teacher-steps", "4", "--batch-size", "8", "--no-progress"]
    assert cli_main([*base, "--coupling", "ot", "--ot-batch", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--ot-batch" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.work").exists()
    assert cli_main([*base, "--coupling", "ot", "--ot-batch", "6", "--out", str(tmp_path / "o")]) == 0


def test_embedded_flow_trainer_takes_the_ot_coupling(tmp_path):
    from schedules.embedded.train import main, train, training_coupling

    res = train("toy2d-flow", 3, 0, 32, 1e-3, tmp_path, 100, coupling="ot", ot_batch=16)
    assert res["info"]["coupling"] == "ot" and res["info"]["ot_batch"] == 16
    with pytest.raises(StepsmithError) as exc:
        training_coupling("toy2d-flow", "c2ot", None, 1000)  # the embedded models are unconditional
    assert exc.value.param == "coupling"
    with pytest.raises(StepsmithError):
        training_coupling("digits-ddpm", "ot", None, 1000)
    with pytest.raises(SystemExit) as exit_:
        main(["toy2d-flow", "--coupling", "ot", "--ot-batch", "0", "--work", str(tmp_path / "w"),
              "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and not (tmp_path / "o").exists()
