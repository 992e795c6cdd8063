"""Metrics from a classifier's predictions on generated samples.

* :func:`inception_score` — the Inception-Score analogue IS = exp(E_x KL(p(y|x) || p(y)))
  with p(y) the mean prediction, from any classifier's probabilities [N, C]. It is 1 when
  every prediction is the same and C when predictions are confident (one-hot) and spread
  evenly over the C classes. With the embedded digits classifier it is a digits IS, not
  comparable with ImageNet Inception numbers.
* :func:`class_accuracy` — for class-conditional samples, the fraction whose predicted
  class (arg-max) is the class they were generated for.
* :func:`digits_logits` — class logits [N, 10] of the embedded digits feature network
  (its ``classify`` head on top of the 128-d features used for FID).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from schedules.io import StepsmithError


def _matrix(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise StepsmithError(f"{what}: expected a non-empty tensor [N, C], got {list(x.shape)}")
    x = x.detach().cpu().to(torch.float64)
    if not torch.isfinite(x).all():
        raise StepsmithError(f"{what}: contains NaN/Inf — the sampler or the classifier diverged")
    return x


def probabilities(logits) -> torch.Tensor:
    """Softmax of logits [N, C] in float64."""
    return torch.softmax(_matrix(logits, "logits"), dim=1)


def check_probabilities(probs, atol: float = 1e-6) -> torch.Tensor:
    """Probabilities [N, C] as float64: non-negative rows that sum to 1 (within ``atol``)."""
    p = _matrix(probs, "probabilities")
    if (p < 0).any() or ((p.sum(dim=1) - 1).abs() > atol).any():
        raise StepsmithError("probabilities must be non-negative and each row must sum to 1; for logits use "
                             "eval.classifier_metrics.probabilities(logits) first")
    return p


def _split_score(p: torch.Tensor) -> float:
    marginal = p.mean(dim=0, keepdim=True)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, marginal)).sum(dim=1)  # 0·log 0 = 0
    return math.exp(float(kl.mean()))


def inception_score(probs, splits: int = 1) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) from class probabilities [N, C]; returns (mean, std).

    As in the original Inception Score, ``splits > 1`` cuts the samples into ``splits``
    contiguous parts of ``N // splits`` (the remainder is dropped), scores each part with
    its own p(y) and returns the mean and the population std of the parts' scores.
    The default, one split, scores all samples at once (std 0): splitting lowers IS because
    each part's p(y) is estimated from fewer samples.
    """
    p = check_probabilities(probs)
    if not isinstance(splits, int) or isinstance(splits, bool) or not 1 <= splits <= p.shape[0]:
        raise StepsmithError(f"splits must be an integer between 1 and the number of samples ({p.shape[0]}), "
                             f"got {splits!r}")
    size = p.shape[0] // splits
    scores = torch.tensor([_split_score(p[i * size:(i + 1) * size]) for i in range(splits)], dtype=torch.float64)
    return float(scores.mean()), float(scores.std(unbiased=False))


def class_accuracy(scores, labels) -> float:
    """Fraction of samples whose arg-max class in ``scores`` (logits or probabilities
    [N, C]) equals the intended class ``labels`` [N] (integers in [0, C))."""
    s = _matrix(scores, "class scores")
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if y.ndim != 1 or y.shape[0] != s.shape[0]:
        raise StepsmithError(f"labels must be a vector of {s.shape[0]} intended classes, got shape {list(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise StepsmithError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.cpu().long()
    if y.numel() and (y.min() < 0 or y.max() >= s.shape[1]):
        raise StepsmithError(f"labels must lie in [0, {s.shape[1]}), got {int(y.min())}..{int(y.max())}")
    return float((s.argmax(dim=1) == y).double().mean())


@torch.no_grad()
def digits_logits(net: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class logits [N, 10] (float64, CPU) of images ``x`` [N, 1, 16, 16] in [-1, 1].

    ``net`` is the embedded digits feature network: the :class:`eval.features.FeatureNetwork`
    that ``load_feature_network("digits-features")`` returns, or a bare
    ``DigitsFeatures``; any module with a ``classify`` method works (put it in eval mode).
    """
    core = getattr(net, "net", net)
    if not callable(getattr(core, "classify", None)):
        raise StepsmithError(f"{type(core).__name__} has no classifier head (a classify method); class metrics need "
                             "the digits-features network or a classifier of your own")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] < 1:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise StepsmithError(f"digits_logits takes images [N, C, H, W], got {got}")
    if not torch.isfinite(x).all():
        raise StepsmithError("images given to the classifier contain NaN/Inf — the sampler diverged")
    device = next(core.parameters(), torch.empty(0)).device
    try:
        out = [core.classify(x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    except ValueError as exc:
        raise StepsmithError(str(exc).splitlines()[0]) from None
    return _matrix(torch.cat(out), "classifier logits")
