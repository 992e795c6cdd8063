"""Noise–data couplings for flow matching: which noise is paired with which sample in a batch.

A coupling is a permutation ``perm`` of one *OT batch*: noise ``x0[i]`` is paired with sample
``x1[perm[i]]`` (and, for conditional data, with that sample's condition ``cond[perm[i]]``).
Every coupling here returns a permutation — each noise and each sample used exactly once — so
the marginals of the batch are untouched. (Sampling pairs from the OT plan with replacement,
as some implementations do, duplicates some points and drops others.)

* ``independent``: the identity — pairs as drawn (plain flow matching / reflow's teacher pairs).
* ``ot``: minibatch exact optimal transport on the squared Euclidean cost.
* ``c2ot``: condition-aware OT — OT that never pairs across class labels, or for continuous
  conditions OT on the squared Euclidean cost plus an adaptively weighted cosine cost.

The assignment is scipy's exact Hungarian solver (``linear_sum_assignment``) on the CPU, inside
the data pipeline; the OT batch (:attr:`Coupling.ot_batch`) is independent of the network batch:
:meth:`Coupling.couple` splits a pool into OT batches and couples each on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from schedules.io import StepsmithError

COUPLINGS = ("independent", "ot", "c2ot")
C2OT_TARGET_RATIO = 0.2  # share of candidate pairs kept cheaper than the independent pairing
_SEARCH_ITERS = 30


def squared_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """[N, N] float64 matrix of ||x0_i - x1_j||² (samples flattened)."""
    a, b = x0.detach().flatten(1).to("cpu", torch.float64), x1.detach().flatten(1).to("cpu", torch.float64)
    return torch.cdist(a, b).pow(2)


def assignment(cost: torch.Tensor) -> torch.Tensor:
    """The exact minimum-cost permutation of a square cost matrix (Hungarian / Jonker–Volgenant, scipy)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm


def independent_coupling(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The pairs as drawn (x0 and x1 independent): the identity permutation."""
    del x1
    return torch.arange(x0.shape[0])


def ot_coupling(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Minibatch exact OT (Tong et al., "Improving and Generalizing Flow-Based Generative Models with
    Minibatch Optimal Transport", TMLR 2024, arXiv:2302.00482; Pooladian et al., "Multisample Flow
    Matching", ICML 2023, arXiv:2304.14772).

    With uniform weights on two batches of equal size the exact OT plan is a permutation matrix
    (Birkhoff), so the assignment problem on ||x0_i - x1_j||² solves it exactly.
    """
    return assignment(squared_cost(x0, x1))


def class_ot_coupling(x0: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C²OT for class labels (Cheng & Schwing, "The Curse of Conditions: Analyzing and Improving Optimal
    Transport for Conditional Flow-Based Generation", ICCV 2025, arXiv:2503.10636): OT under a hard
    class constraint.

    Noise ``x0[i]`` carries the label of the sample it was drawn with, ``labels[i]``; OT runs within
    each class, so a noise is never paired across classes and every class keeps the noise prior it
    would have under the independent coupling (plain OT skews it). The paper's infinite-weight
    class cost is the same as solving each class block on its own, which this does.
    """
    labels = labels.detach().cpu().reshape(len(labels), -1)
    if labels.shape[1] != 1:
        raise StepsmithError("class-constrained C²OT needs one integer label per sample", param="coupling")
    labels = labels[:, 0]
    perm = torch.empty(len(labels), dtype=torch.long)
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        perm[idx] = idx[ot_coupling(x0[idx], x1[idx])]
    return perm


def cosine_cost(cond: torch.Tensor) -> torch.Tensor:
    """[N, N] float64 matrix 1 - cos(c_i, c_j) between continuous conditions (flattened)."""
    c = cond.detach().flatten(1).to("cpu", torch.float64)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (1 - c @ c.T).clamp_min(0)


def cheaper_share(cost: torch.Tensor, independent: torch.Tensor) -> float:
    """Share of candidate pairs (i, j) that cost no more than noise i's independent pair (i, i)."""
    return float((cost <= independent[:, None]).double().mean())


def condition_weight(m: torch.Tensor, c: torch.Tensor, target: float = C2OT_TARGET_RATIO) -> float:
    """C²OT's adaptive weight w: the share of pairs with M + w·C cheaper than the independent pairing
    (M's diagonal) falls as w grows; bisect for the w that brings it to ``target``.

    The share is ≈ 0.5 at w = 0 (a random candidate beats a random partner half the time), so
    w = 0 is returned when it is already at or below the target.
    """
    diag = torch.diagonal(m).clone()
    if cheaper_share(m, diag) <= target:
        return 0.0
    lo, hi = 0.0, max(float(m.mean()), 1e-12)
    while cheaper_share(m + hi * c, diag) > target and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(_SEARCH_ITERS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cheaper_share(m + mid * c, diag) > target else (lo, mid)
    return hi


def continuous_c2ot_coupling(x0: torch.Tensor, x1: torch.Tensor, cond: torch.Tensor,
                             target: float = C2OT_TARGET_RATIO) -> torch.Tensor:
    """C²OT for continuous conditions (Cheng & Schwing 2025, arXiv:2503.10636): OT on
    ||x0_i - x1_j||² + w·(1 - cos(c_i, c_j)), where noise i carries the condition ``cond[i]`` of the
    sample it was drawn with and w is chosen per batch by :func:`condition_weight`."""
    m = squared_cost(x0, x1)
    c = cosine_cost(cond)
    return assignment(m + condition_weight(m, c, target) * c)


def is_class_labels(cond: torch.Tensor) -> bool:
    """Integer (or bool) conditions with one value per sample are class labels."""
    return not torch.is_floating_point(cond) and cond.reshape(len(cond), -1).shape[1] == 1


@dataclass(frozen=True)
class Coupling:
    """A coupling method and the OT batch it works on (``None``: the whole pool is one OT batch)."""

    kind: str = "independent"
    ot_batch: int | None = None
    target_ratio: float = C2OT_TARGET_RATIO

    def __post_init__(self) -> None:
        if self.kind not in COUPLINGS:
            raise StepsmithError(f"`coupling` {self.kind!r}: use one of {', '.join(COUPLINGS)}", param="coupling")
        if self.ot_batch is not None and self.ot_batch < 1:
            raise StepsmithError(f"`ot_batch` must be at least 1, got {self.ot_batch}", param="ot_batch")

    def check(self, n_data: int, conditional: bool) -> None:
        """Refuse an OT batch larger than the ``n_data`` points it draws from, and C²OT without conditions."""
        if self.kind == "c2ot" and not conditional:
            raise StepsmithError("`coupling` 'c2ot' needs class labels or conditions, and this model "
                                 "is unconditional; use the coupling 'ot'", param="coupling")
        if self.kind != "independent" and self.ot_batch is not None and self.ot_batch > n_data:
            raise StepsmithError(f"`ot_batch` {self.ot_batch} is larger than the {n_data} training pairs it is "
                                 "drawn from", param="ot_batch")

    def clipped(self, n_data: int) -> Coupling:
        """The same coupling with its OT batch cut to ``n_data`` (a held-out set smaller than an OT batch)."""
        return replace(self, ot_batch=None if self.ot_batch is None else min(self.ot_batch, n_data))

    def pool_size(self, batch_size: int) -> int:
        """How many pairs to draw so that a batch of ``batch_size`` is cut from whole OT batches."""
        if self.kind == "independent" or self.ot_batch is None:
            return batch_size
        return math.ceil(batch_size / self.ot_batch) * self.ot_batch

    def permutation(self, x0: torch.Tensor, x1: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The coupling of one OT batch."""
        if self.kind == "independent":
            return independent_coupling(x0, x1)
        if self.kind == "ot":
            return ot_coupling(x0, x1)
        if cond is None:
            raise StepsmithError("`coupling` 'c2ot' needs the samples' conditions", param="coupling")
        if is_class_labels(cond):
            return class_ot_coupling(x0, x1, cond)
        return continuous_c2ot_coupling(x0, x1, cond, self.target_ratio)

    def couple(self, x0: torch.Tensor, x1: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """A permutation of the whole pool, coupled OT batch by OT batch (``x1[perm]`` pairs with ``x0``)."""
        n = x0.shape[0]
        if x1.shape[0] != n:
            raise StepsmithError(f"coupling needs as many samples as noises, got {x1.shape[0]} and {n}")
        if self.kind == "independent":
            return torch.arange(n)
        size = n if self.ot_batch is None else self.ot_batch
        parts = []
        for b0 in range(0, n, size):
            sl = slice(b0, min(n, b0 + size))
            parts.append(b0 + self.permutation(x0[sl], x1[sl], None if cond is None else cond[sl]))
        return torch.cat(parts)
