"""Several metrics per sweep row, from the same samples, and their MMHM per NFE.

``metric`` of a sweep is one name — today's behaviour: it is the row's ``value`` — or a
comma-separated list (or sequence) whose first name is the main metric (the row's ``value``,
the plot and the bold of the main table); every listed name is then also a key of
``row["metrics"]`` in ``report.json``:

* ``fid``, ``kid`` — under the feature network (images only);
* ``wasserstein`` — exact W2 against true samples (low-dimensional vectors only);
* ``teacher`` — MSE to the teacher's samples from the same noises;
* ``fid-teacher`` — FID against the teacher's samples from the same noises (same feature network; raw
  points for vectors): how far a row's *distribution* is from the many-step sampler's at the same
  conditions and guidance, 0 for the teacher itself. For a guided model this, not FID against the data,
  is the distance a schedule can close: guidance moves the sampler's own distribution away from the data
  (builtin:digits-cond teacher FID against the digits 97 / 149 / 330 / 816 at w = 1 / 1.5 / 2 / 3,
  ``stepsmith eval --model builtin:digits-cond --classes all --guidance 1,1.5,2,3 --methods uniform --nfe 8,32
  --out DIR``),
  so a row that under-integrates the guided ODE — or leaves residual noise — can score a lower data FID
  than the converged sampler (see BENCHMARKS.md, digits-cond);
* ``precision``, ``recall`` (k = 3), ``density``, ``coverage`` (k = 5) — of the generated
  features against the real ones (:func:`eval.manifold.manifold_metrics`); images use the
  feature network, low-dimensional models (toy2d) their raw points, which are their own
  features;
* ``is`` — the Inception-Score analogue from the feature network's classifier head (the
  digits network has one; Inception and networks of your own without ``classify`` are refused);
* ``class-accuracy`` — for a class-conditional model (``--classes``): the fraction of samples the
  feature network's classifier head assigns to the class they were generated for (sample i has
  label i mod P in every row); refused for unconditional models; ``clip`` — CLIP score
  (:mod:`eval.clip_score`) of a text-to-image pipeline's decoded images against their own prompts
  (sample i ↔ prompt i mod P), under a local CLIP folder (``clip_model``); refused for other models;
* ``mmhm`` — aggregates every other listed metric (:func:`eval.mmhm.mmhm`), min–max per metric
  over the rows of one NFE — of one (NFE, guidance) cell in a guidance-list sweep, where only rows at
  matched steps and guidance compare fairly (the teacher row is not a table and is left out); it
  cannot be first.

Every name is checked against the model before any model call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eval.mmhm import BY_NFE, BY_NFE_GUIDANCE, EPS, Bounds, GroupedBounds, group_key, metric_direction, mmhm
from schedules.io import StepsmithError

LEGACY = ("fid", "kid", "wasserstein", "teacher")
MANIFOLD = ("precision", "recall", "density", "coverage")
KNOWN = LEGACY + MANIFOLD + ("fid-teacher", "is", "class-accuracy", "clip", "mmhm")
FEATURE_NET = ("fid", "kid", "fid-teacher", *MANIFOLD, "is", "class-accuracy")  # image metrics needing the feature network
K_PRECISION, K_DENSITY = 3, 5


def parse_metrics(metric: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"fid,kid"`` or ``["fid", "kid"]`` → ``("fid", "kid")``; unknown or repeated names are refused."""
    if metric is None:
        return None
    parts = metric.replace(" ", "").split(",") if isinstance(metric, str) else [str(m).strip() for m in metric]
    names = tuple(p.lower() for p in parts if p)
    if not names:
        raise StepsmithError(f"`metric` lists no metric; choose from {', '.join(KNOWN)}", param="metric")
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise StepsmithError(f"unknown `metric` {', '.join(map(repr, unknown))}; choose from {', '.join(KNOWN)} "
                             "(a comma list: the first is the main metric)", param="metric")
    if len(set(names)) != len(names):
        raise StepsmithError(f"`metric` repeats a name: {','.join(names)}", param="metric")
    return names


def resolve_metric(adapter, metric: str | None) -> str:
    """The sweep's metric: the given one, checked against the model's sample shape, or the default."""
    if metric is None:
        return "wasserstein" if len(adapter.sample_shape) == 1 else "fid"
    if metric not in LEGACY:
        raise StepsmithError(f"unknown `metric` {metric!r}; choose one of {', '.join(LEGACY)}", param="metric")
    if metric in ("fid", "kid") and len(adapter.sample_shape) != 3:
        raise StepsmithError(f"{metric} scores images [C, H, W]; {adapter.name} makes samples of shape "
                             f"{list(adapter.sample_shape)} — use `metric` wasserstein or teacher", param="metric")
    if metric == "wasserstein" and len(adapter.sample_shape) != 1:
        raise StepsmithError("the exact Wasserstein distance is for low-dimensional vectors; use `metric` fid, kid or "
                             "teacher for images", param="metric")
    return metric


def _has_classifier(features: Any, images_16: bool) -> bool:
    """Whether the feature network that a sweep would load has a ``classify`` head (no model call)."""
    if features is None:
        return images_16
    if isinstance(features, str):
        if features in ("digits-features", "builtin:digits-features", "sharp-features", "builtin:sharp-features"):
            return True
        if ".py:" not in features:
            return False
        from eval.features import load_feature_network

        features = load_feature_network(features)
    core = getattr(features, "net", features)
    return callable(getattr(core, "classify", None))


def check_applicable(adapter, name: str, *, teacher: bool, features: Any) -> None:
    """A clear :class:`StepsmithError` when ``name`` cannot be computed for this model and setup."""
    shape = tuple(adapter.sample_shape)
    cond = getattr(adapter, "conditioning", None)
    if name == "class-accuracy" and cond is not None and cond.kind == "class":
        if len(shape) != 3 or not _has_classifier(features, shape == (1, 16, 16)):
            raise StepsmithError(f"`metric` class-accuracy needs a classifier of {adapter.name}'s images (the "
                                 "digits-features network has one; pass --features)", param="metric")
        return
    if name == "class-accuracy":
        raise StepsmithError(f"`metric` class-accuracy scores samples against the class they were generated for; "
                             f"{adapter.name} is an unconditional model (a sweep drives no class labels) — drop "
                             "class-accuracy", param="metric")
    if name == "clip":
        if getattr(adapter, "pipeline", None) is not None and cond is not None and cond.kind == "prompt":
            return
        raise StepsmithError("`metric` clip (CLIP score) scores the images of a text-to-image pipeline against its "
                             f"prompts (--prompts, --clip-model DIR); {adapter.name} is not text-to-image — drop clip",
                             param="metric")
    if name in ("teacher", "fid-teacher") and not teacher:
        raise StepsmithError(f"`metric` {name} compares with the reference sampler's samples: drop --no-teacher "
                             "(teacher=True)", param="teacher")
    if name in ("fid-teacher", *MANIFOLD) and len(shape) not in (1, 3):
        raise StepsmithError(f"{name} needs images [C, H, W] (feature network) or vectors (raw points); "
                             f"{adapter.name} makes samples of shape {list(shape)}", param="metric")
    if name == "is" and (len(shape) != 3 or not _has_classifier(features, shape == (1, 16, 16))):
        what = "its samples are not images" if len(shape) != 3 else "the feature network has no classifier head"
        raise StepsmithError(f"`metric` is (Inception-Score analogue) needs a classifier's predictions; for "
                             f"{adapter.name} {what} (the digits-features network has one)", param="metric")


@dataclass(frozen=True)
class MetricPlan:
    """The metrics of a sweep: ``names[0]`` is the main one; ``extended`` is False for one legacy
    name (the report is then exactly today's)."""

    names: tuple[str, ...]
    extended: bool
    images: bool

    @property
    def main(self) -> str:
        return self.names[0]

    @property
    def computed(self) -> tuple[str, ...]:
        """Every listed metric but ``mmhm`` (computed per row from the samples)."""
        return tuple(n for n in self.names if n != "mmhm")

    @property
    def mmhm_inputs(self) -> tuple[str, ...]:
        return self.computed if "mmhm" in self.names else ()

    @property
    def needs_feature_net(self) -> bool:
        return self.images and any(n in FEATURE_NET for n in self.names)

    @property
    def needs_real(self) -> bool:
        return any(n not in ("teacher", "clip") for n in self.computed)


def plan_metrics(adapter, names: tuple[str, ...], *, teacher: bool, features: Any) -> MetricPlan:
    """Check every name against the model (main first); ``names`` from :func:`parse_metrics`."""
    if names[0] == "mmhm":
        raise StepsmithError("`metric` mmhm aggregates the other metrics, so it cannot be the main (first) one; "
                             "list it after them, e.g. fid,kid,precision,recall,mmhm", param="metric")
    if names == ("mmhm",) or ("mmhm" in names and len(names) < 2):
        raise StepsmithError("`metric` mmhm needs other metrics to aggregate", param="metric")
    for n in names:
        if n in LEGACY:
            resolve_metric(adapter, n)
        elif n != "mmhm":
            check_applicable(adapter, n, teacher=teacher, features=features)
    if "teacher" in names and not teacher:
        raise StepsmithError("`metric` teacher needs the reference sampler: pass teacher=True", param="teacher")
    extended = not (len(names) == 1 and names[0] in LEGACY)
    return MetricPlan(names, extended, len(adapter.sample_shape) == 3)


def lower_is_better(name: str) -> bool:
    return metric_direction(name) == "lower"


# --------------------------------------------------------------------------- values


def manifold_values(real_f: torch.Tensor, fake_f: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Precision / recall / density / coverage among ``names`` (all four from one distance pass)."""
    from eval.manifold import manifold_metrics

    wanted = [n for n in names if n in MANIFOLD]
    if not wanted:
        return {}
    m = manifold_metrics(real_f, fake_f, k=K_PRECISION, k_density=K_DENSITY).as_dict()
    return {n: float(m[n]) for n in wanted}


def class_accuracy_of(net, x_shard: torch.Tensor, labels_shard: torch.Tensor, gather) -> float:
    """Class accuracy of the samples of every process against their intended labels (gathered alike)."""
    from eval.classifier_metrics import class_accuracy, digits_logits

    logits = digits_logits(net, x_shard) if x_shard.shape[0] else torch.zeros(0, 10, dtype=torch.float64)
    return class_accuracy(gather(logits), gather(labels_shard.long()))


def inception_score_of(net, x_shard: torch.Tensor, gather) -> float:
    """IS analogue of the samples of every process: the classifier's logits, gathered, one split."""
    from eval.classifier_metrics import digits_logits, inception_score, probabilities

    logits = digits_logits(net, x_shard) if x_shard.shape[0] else torch.zeros(0, 10, dtype=torch.float64)
    return inception_score(probabilities(gather(logits)))[0]


# --------------------------------------------------------------------------- MMHM per NFE (and guidance)


def _cell(c: int | tuple[int, float | None]) -> tuple[int, float | None]:
    return (int(c[0]), c[1]) if isinstance(c, tuple) else (int(c), None)


def check_bounds(bounds: Bounds | GroupedBounds, plan: MetricPlan,
                 nfes: Sequence[int | tuple[int, float | None]] | None = None) -> None:
    """Frozen bounds must cover every MMHM metric (and, grouped, every NFE — or (NFE, guidance) pair — of the
    sweep)."""
    pools = [bounds] if isinstance(bounds, Bounds) else [bounds.lookup(*_cell(c)) for c in (nfes or ())]
    for b in pools:
        missing = [m for m in plan.mmhm_inputs if m not in b.ranges]
        if missing:
            raise StepsmithError(f"the MMHM bounds file has no range for {', '.join(missing)} (it covers "
                                 f"{', '.join(b.metrics)}); save bounds from a run with the same metrics",
                                 param="bounds")


def _finite(row: dict[str, Any], names: Sequence[str]) -> bool:
    return all(isinstance(row["metrics"].get(n), (int, float)) and math.isfinite(row["metrics"][n]) for n in names)


def row_cell(row: dict[str, Any]) -> tuple[int, float | None]:
    """The group a row is compared in: its NFE and its guidance scale (None outside a guidance-list sweep)."""
    g = row.get("guidance")
    return int(row["nfe"]), (None if g is None else float(g))


def cells_of(rows: list[dict[str, Any]]) -> list[tuple[int, float | None]]:
    """The (NFE, guidance) groups of ``rows``, by NFE then guidance."""
    return sorted({row_cell(r) for r in rows}, key=lambda c: (c[0], -1.0 if c[1] is None else c[1]))


def apply_mmhm(rows: list[dict[str, Any]], plan: MetricPlan,
               frozen: Bounds | GroupedBounds | None) -> GroupedBounds:
    """Set ``row["metrics"]["mmhm"]`` per group — one NFE, or one (NFE, guidance) cell when the rows carry a
    guidance (rows with a non-finite metric get NaN and stay out of the bounds); returns the bounds used,
    one pool per group (``group_by`` ``"nfe"`` or ``"nfe,guidance"``)."""
    names = plan.mmhm_inputs
    used: dict[str, Bounds] = {}
    cells = cells_of(rows)
    for nfe, w in cells:
        group = [r for r in rows if row_cell(r) == (nfe, w)]
        ok = [r for r in group if _finite(r, names)]
        for r in group:
            r["metrics"]["mmhm"] = math.nan
        if not ok:
            continue
        b = None if frozen is None else frozen if isinstance(frozen, Bounds) else frozen.lookup(nfe, w)
        scores = mmhm([r["metrics"] for r in ok], names, bounds=b)
        used[group_key(nfe, w)] = scores.bounds
        for r, s in zip(ok, scores):
            r["metrics"]["mmhm"] = s
    return GroupedBounds(used, BY_NFE_GUIDANCE if any(w is not None for _, w in cells) else BY_NFE)


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1 = smallest), ties sharing the mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks); ``None`` below 3 rows or for a constant."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


SAME_SCORE_RTOL = 1e-6  # the same table scored by two processes differs in the last digits (float reductions)


def same_score(a: float, b: float) -> bool:
    """Whether two scores are one score measured twice (within :data:`SAME_SCORE_RTOL`): a tie, not a win."""
    return abs(a - b) <= SAME_SCORE_RTOL * max(abs(a), abs(b), 1e-300)


def first_best(rows: Sequence[dict[str, Any]], key) -> dict[str, Any]:
    """The first of ``rows`` (in their order) whose ``key`` ties the largest: ties go to the earlier row."""
    top = max(key(r) for r in rows)
    return next(r for r in rows if same_score(key(r), top))


def agreement(rows: list[dict[str, Any]], main: str) -> list[dict[str, Any]]:
    """Per NFE (per (NFE, guidance) cell with a guidance list, which the entry then names): the best row by
    ``main`` and by MMHM, whether they agree, and Spearman's ρ between the two rankings (``main``
    sign-flipped when lower is better, so ρ = 1 is full agreement)."""
    sign = -1.0 if lower_is_better(main) else 1.0
    out = []
    for nfe, w in cells_of(rows):
        group = [r for r in rows if row_cell(r) == (nfe, w) and _finite(r, (main, "mmhm"))]
        if not group:
            continue
        by_main = first_best(group, lambda r: sign * r["metrics"][main])["label"]
        by_mmhm = first_best(group, lambda r: r["metrics"]["mmhm"])["label"]
        rho = spearman([sign * r["metrics"][main] for r in group], [r["metrics"]["mmhm"] for r in group])
        out.append({"nfe": nfe, **({} if w is None else {"guidance": w}), "best_" + main: by_main,
                    "best_mmhm": by_mmhm, "agree": by_main == by_mmhm, "spearman": rho, "rows": len(group)})
    return out


def mmhm_info(rows: list[dict[str, Any]], plan: MetricPlan, used: GroupedBounds,
              source: str) -> dict[str, Any]:
    """``report["mmhm"]``: what went in, the bounds per group (NFE, or (NFE, guidance)), and where the main
    metric disagrees."""
    return {"metrics": list(plan.mmhm_inputs), "eps": EPS, "group_by": used.group_by, "bounds_source": source,
            "bounds": used.to_json()["groups"], "agreement": agreement(rows, plan.main)}
