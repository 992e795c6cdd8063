"""Trust tests for eval.classifier_metrics: IS and class accuracy against direct formulas."""

import math

import numpy as np
import pytest
import torch

from eval.classifier_metrics import class_accuracy, digits_logits, inception_score, probabilities
from schedules.io import StepsmithError


def direct_is(p: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """The original formula: per split exp(mean_x Σ_y p log(p / p_y)), then mean and std."""
    size = len(p) // splits
    scores = []
    for s in range(splits):
        part = p[s * size:(s + 1) * size]
        py = part.mean(0)
        kl = [sum(q * math.log(q / m) for q, m in zip(row, py) if q > 0) for row in part]
        scores.append(math.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def test_uniform_predictions_give_one():
    mean, std = inception_score(torch.full((40, 10), 0.1))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == 0.0


@pytest.mark.parametrize("c", [2, 7, 10])
def test_balanced_one_hot_gives_number_of_classes(c):
    p = torch.eye(c).repeat(5, 1)
    assert inception_score(p)[0] == pytest.approx(c, rel=1e-12)
    assert inception_score(p, splits=5) == pytest.approx((c, 0.0), abs=1e-9)


@pytest.mark.parametrize("splits", [1, 3, 4])
def test_matches_direct_formula(splits):
    g = np.random.default_rng(splits)
    logits = g.normal(size=(50, 6)) * 2
    p = probabilities(torch.from_numpy(logits))
    ref = direct_is(p.numpy(), splits)
    assert inception_score(p, splits=splits) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_is_refuses_logits_and_bad_splits():
    with pytest.raises(StepsmithError, match="sum to 1"):
        inception_score(torch.randn(10, 3))
    p = torch.full((4, 2), 0.5)
    for bad in (0, 5, 1.5):
        with pytest.raises(StepsmithError, match="splits"):
            inception_score(p, splits=bad)
    with pytest.raises(StepsmithError, match="NaN"):
        inception_score(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(StepsmithError, match=r"\[N, C\]"):
        inception_score(torch.ones(3))


def test_class_accuracy():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.1, 0.2, 0.7], [0.0, 5.0, 1.0], [1.0, 0.0, 3.0]])
    assert class_accuracy(scores, torch.tensor([0, 2, 0, 2])) == 0.75
    assert class_accuracy(torch.softmax(scores, 1), [0, 2, 1, 2]) == 1.0
    with pytest.raises(StepsmithError, match="vector of 4"):
        class_accuracy(scores, torch.tensor([0, 1]))
    with pytest.raises(StepsmithError, match=r"\[0, 3\)"):
        class_accuracy(scores, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(StepsmithError, match="integer"):
        class_accuracy(scores, torch.tensor([0.0, 1.0, 2.0, 0.0]))


@pytest.fixture(scope="module")
def digits():
    from eval.features import load_feature_network
    from schedules.embedded.nets import digits_data

    x, y = digits_data()
    return x, y, load_feature_network("digits-features")


def test_digits_logits_classify_real_digits(digits):
    x, y, net = digits
    logits = digits_logits(net, x, batch_size=500)
    assert logits.shape == (x.shape[0], 10) and logits.dtype == torch.float64
    # the wrapper and the bare network agree (same batch size: conv kernels may round differently per batch size)
    assert torch.equal(logits, digits_logits(net.net, x, batch_size=500))
    assert class_accuracy(logits, y) > 0.95
    mean, _ = inception_score(probabilities(logits))
    assert 8.0 < mean <= 10.0  # confident and balanced over the ten digits


def test_digits_logits_errors(digits):
    x, _, net = digits
    with pytest.raises(StepsmithError, match="no classifier head"):
        digits_logits(torch.nn.Linear(2, 2), x[:2])
    with pytest.raises(StepsmithError, match="16, 16"):
        digits_logits(net, torch.zeros(2, 1, 8, 8))
    with pytest.raises(StepsmithError, match="NaN"):
        digits_logits(net, torch.full((2, 1, 16, 16), float("nan")))
    with pytest.raises(StepsmithError, match=r"\[N, C, H, W\]"):
        digits_logits(net, torch.zeros(16, 16))
