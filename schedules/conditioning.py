"""Conditional models: what a sample is conditioned on, and classifier-free guidance.

A :class:`Conditioning` is the condition set of a run: class labels (or, for text adapters,
prompts), the negative branch (a null label or negative prompt) and the guidance scale ``w``.
Sample *i* of a run gets condition *i mod P* (P = number of conditions), so every sampler,
search and evaluation that draws sample *i* from the same noise also gives it the same condition.

Loops slice their noises into micro-batches; :func:`bind` says which sample indices the current
batch holds, and the :class:`ConditionalAdapter` reads them (:func:`bound_indices`) in every
network call. Without a binding a batch of B holds samples 0..B-1. Bindings compose: inside
``bind(idx)`` a ``bind(sub)`` selects ``idx[sub]``, so a teacher run with micro-batches inside a
search micro-batch still names the right samples. Unconditional adapters ignore bindings.

Guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"): the network output is
o = o_u + w·(o_c − o_u), computed in ONE batched call on [x; x] with the conditional and the
unconditional inputs concatenated. Every prediction type here is affine in the network output,
so guiding the output guides the denoiser D. One guided evaluation counts as one model call
(``adapter.calls``): CFG doubles the batch, not the NFE. With w = 1 (or no negative branch) the
unconditional half is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from schedules.adapters import ModelAdapter
from schedules.io import StepsmithError

_BOUND: ContextVar[torch.Tensor | None] = ContextVar("stepsmith_bound_indices", default=None)


# --------------------------------------------------------------------------- sample indices


def micro_batches(n: int, batch_size: int | None) -> list[slice]:
    """Slices covering 0..n-1 in order, ``batch_size`` at a time (None or 0: one slice)."""
    bs = n if not batch_size else int(batch_size)
    return [slice(b0, min(b0 + bs, n)) for b0 in range(0, n, max(bs, 1))]


def _as_index(sel: slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(sel, slice):
        if sel.stop is None:
            raise StepsmithError("bind(slice) needs an explicit stop")
        return torch.arange(sel.start or 0, sel.stop, sel.step or 1)
    return torch.as_tensor(sel, dtype=torch.long).reshape(-1)


@contextmanager
def bind(sel: slice | torch.Tensor | Sequence[int]) -> Iterator[torch.Tensor]:
    """Declare which samples (of the enclosing batch) the batches evaluated inside hold.

    ``sel`` indexes the enclosing binding (or, at top level, the run's samples 0, 1, ...).
    """
    idx = _as_index(sel)
    outer = _BOUND.get()
    if outer is not None:
        if len(idx) and int(idx.max()) >= len(outer):
            raise StepsmithError(f"bind: index {int(idx.max())} outside the enclosing batch of {len(outer)}")
        idx = outer[idx]
    token = _BOUND.set(idx)
    try:
        yield idx
    finally:
        _BOUND.reset(token)


def bound_indices(batch: int) -> torch.Tensor:
    """The sample indices of a batch of ``batch`` inputs: the current binding, else 0..batch-1."""
    idx = _BOUND.get()
    if idx is None:
        return torch.arange(batch)
    if len(idx) != batch:
        raise StepsmithError(f"a batch of {batch} inputs was evaluated inside bind() of {len(idx)} samples: "
                             "the loop must bind the indices of the batch it evaluates")
    return idx


# --------------------------------------------------------------------------- the condition set


def _check_guidance(w: Any) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)) or float(w) < 0:
        raise StepsmithError(f"`guidance` must be a finite number ≥ 0 (1 = no guidance), got {w!r}", param="guidance")
    return float(w)


# ``extra`` entries a table's conditioning block and fingerprint record: Flux's embedded (distilled) guidance, the
# dynamic-shift μ and image sequence length of the resolution (SD3/Flux schedules depend on them), and SDXL's
# negative branch of zeros (no negative prompt under force_zeros_for_empty_prompt: not the encoded ""); SD3 / Flux's
# T5 prompt length (the padding tokens are attended, so it changes the network call)
RECORDED_EXTRA = ("distilled_guidance", "mu", "image_seq_len", "negative_embeds", "max_sequence_length")


@dataclass(frozen=True)
class Conditioning:
    """What a conditional run is conditioned on; sample *i* gets condition *i mod P*.

    ``labels`` are class labels (``"all"``: every class of the model, resolved when it loads), or
    ``prompts`` text prompts (for text-to-image adapters); ``null_label`` / ``negative`` is the
    unconditional branch of guidance; ``guidance`` the scale w (1: no guidance); ``height`` /
    ``width`` the image size where the model has a choice.
    """

    labels: tuple[int, ...] | str | None = None
    prompts: tuple[str, ...] | None = None
    null_label: int | None = None
    negative: str | None = None
    guidance: float = 1.0
    height: int | None = None
    width: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance", _check_guidance(self.guidance))
        if (self.labels is None) == (self.prompts is None):
            raise StepsmithError("a Conditioning holds class labels or prompts (exactly one of them)", param="labels")
        if isinstance(self.labels, str):
            if self.labels != "all":
                raise StepsmithError(f"`labels` must be integers or 'all', got {self.labels!r}", param="labels")
        elif self.labels is not None:
            labels = tuple(self.labels)
            if not labels or any(isinstance(v, bool) or not isinstance(v, int) for v in labels):
                raise StepsmithError(f"`labels` must be a non-empty list of integers, got {self.labels!r}"[:200],
                                     param="labels")
            object.__setattr__(self, "labels", labels)
        if self.prompts is not None:
            prompts = tuple(self.prompts)
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise StepsmithError("`prompts` must be a non-empty list of non-empty strings", param="prompts")
            object.__setattr__(self, "prompts", prompts)

    @property
    def kind(self) -> str:
        return "class" if self.labels is not None else "prompt"

    @property
    def items(self) -> tuple:
        if isinstance(self.labels, str):
            raise StepsmithError("labels='all' is resolved against a model first (ConditionalAdapter does it)")
        return self.labels if self.labels is not None else self.prompts

    @property
    def size(self) -> int:
        """P: the number of distinct conditions."""
        return len(self.items)

    @property
    def has_negative(self) -> bool:
        return self.null_label is not None if self.kind == "class" else self.negative is not None

    @property
    def guided(self) -> bool:
        """Whether evaluations need the unconditional branch (w ≠ 1 and a negative branch exists)."""
        return self.guidance != 1.0 and self.has_negative

    def condition_index(self, sample_indices: torch.Tensor) -> torch.Tensor:
        """The condition of each sample: index mod P."""
        return sample_indices.long() % self.size

    def labels_of(self, sample_indices: torch.Tensor) -> torch.Tensor:
        """Class labels of the samples (class conditioning)."""
        return torch.tensor(self.items, dtype=torch.long)[self.condition_index(sample_indices)]

    def recorded(self) -> dict[str, Any]:
        """The :data:`RECORDED_EXTRA` entries of ``extra`` (what else a table is valid for)."""
        return {k: self.extra[k] for k in RECORDED_EXTRA if k in self.extra}

    def fingerprint(self) -> str:
        """sha256 of the condition set, the negative branch, the guidance scale (and the recorded extras)."""
        src = json.dumps({"kind": self.kind, "items": list(self.items), "null": self.null_label,
                          "negative": self.negative, "guidance": self.guidance}, sort_keys=True)
        base = hashlib.sha256(src.encode()).hexdigest()[:16]
        rec = self.recorded()
        if not rec:
            return base
        return hashlib.sha256(json.dumps({"base": base, **rec}, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The table's ``conditioning`` block: what a table searched under this conditioning is valid for."""
        d: dict[str, Any] = {"kind": self.kind, "guidance": self.guidance, "conditions": self.size,
                             "fingerprint": self.fingerprint()}
        if self.kind == "class":
            d.update(classes=list(self.items), null_class=self.null_label)
        else:
            d.update(negative=self.negative)
        if self.height is not None or self.width is not None:
            d.update(height=self.height, width=self.width)
        return {**d, **self.recorded()}

    def with_guidance(self, w: float) -> Conditioning:
        return Conditioning(self.labels, self.prompts, self.null_label, self.negative, w, self.height, self.width,
                            self.extra)


def parse_classes(text: str) -> tuple[int, ...] | str:
    """``--classes``: ``all`` or comma-separated integers (e.g. ``0,1,2``)."""
    text = str(text).strip()
    if text == "all":
        return "all"
    try:
        labels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise StepsmithError(f"`classes` {text!r} must be 'all' or comma-separated integers, e.g. 0,1,2",
                             param="classes") from None
    if not labels:
        raise StepsmithError("`classes` is empty; give 'all' or labels such as 0,1,2", param="classes")
    return labels


# --------------------------------------------------------------------------- table validity


def _setting(v: Any) -> str:
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def conditioning_mismatch(block: dict | None, cond: Conditioning | None) -> str | None:
    """Why a table's ``conditioning`` block does not fit ``cond`` (None when it fits or says nothing)."""
    if block is None:
        return None if cond is None else "the table records no conditioning (searched for an unconditional run?)"
    if cond is None:
        return f"the table was searched for a conditional run (guidance {block.get('guidance')})"
    why = []
    if block.get("guidance") is not None and float(block["guidance"]) != cond.guidance:
        why.append(f"guidance {block['guidance']:g} (this run: {cond.guidance:g})")
    if block.get("fingerprint") is not None and block["fingerprint"] != cond.fingerprint() and not why:
        now = cond.describe()  # the recorded settings that differ, by name; else the condition set itself
        named = [k for k in sorted(set(block) & set(now))
                 if k not in ("fingerprint", "guidance", "conditions") and block[k] != now[k]]
        why = [f"{k} {_setting(block[k])} (this run: {_setting(now[k])})" for k in named]
        # prompts are recorded by fingerprint only: a fingerprint the named settings may not explain
        if "classes" not in named and (not named or block.get("conditions", now["conditions"]) != now["conditions"]):
            why.append(f"another condition set (fingerprint {block['fingerprint']} vs {cond.fingerprint()})")
    return ("the table was searched for " + "; ".join(why)) if why else None


def warn_if_mismatch(table, cond: Conditioning | None) -> str | None:
    """Warn (``UserWarning``) when ``table`` was searched for another conditioning; returns the message."""
    msg = conditioning_mismatch(getattr(table, "conditioning", None), cond)
    if msg is not None:
        warnings.warn(f"{msg}; its steps may not be the best for this setting — search one for it", stacklevel=2)
    return msg


# --------------------------------------------------------------------------- the guided adapter


def class_label_kwargs(cond: Conditioning, idx: torch.Tensor, uncond: bool, device: torch.device) -> dict[str, Any]:
    """Network keyword arguments of a diffusers ``UNet2DModel`` with ``num_class_embeds``."""
    labels = torch.full((len(idx),), cond.null_label, dtype=torch.long) if uncond else cond.labels_of(idx)
    return {"class_labels": labels.to(device)}


def _cat_kwargs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] for k in a}


@dataclass(eq=False)
class ConditionalAdapter(ModelAdapter):
    """A :class:`ModelAdapter` whose every network call is conditioned (and guided) per sample.

    ``condition_kwargs(cond, sample_indices, uncond, device) -> dict`` builds the network's
    conditioning inputs for a batch (:func:`class_label_kwargs` for class labels; a text
    adapter returns prompt embeddings): adding a model family is writing that one function.
    ``guide_above_one`` (the pipeline adapters) guides only for w > 1, as diffusers pipelines do: for
    0 ≤ w ≤ 1 they run the conditional branch alone, so the adapter does too and stays exact at every w.
    """

    conditioning: Conditioning | None = None
    condition_kwargs: Any = class_label_kwargs
    guide_above_one: bool = False

    @property
    def guided(self) -> bool:
        """Whether evaluations run the unconditional branch too (see ``guide_above_one``)."""
        return self.conditioning.guided and (self.conditioning.guidance > 1.0 or not self.guide_above_one)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conditioning is None:
            raise StepsmithError(f"{self.name} is a conditional model: give it a Conditioning", param="conditioning")
        w = self.conditioning.guidance
        if (w > 1.0 if self.guide_above_one else w != 1.0) and not self.conditioning.has_negative:
            what = "null label" if self.conditioning.kind == "class" else "negative prompt"
            raise StepsmithError(f"guidance {self.conditioning.guidance:g} needs a {what} for the unconditional "
                                 "branch; pass one or use guidance 1", param="guidance")

    def network(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.conditioning
        idx = bound_indices(x.shape[0])
        kw_c = self.condition_kwargs(cond, idx, False, x.device)
        if not self.guided:
            return self.call(self.module, x, t, **self.model_kwargs, **kw_c)
        kw_u = self.condition_kwargs(cond, idx, True, x.device)
        out = self.call(self.module, torch.cat([x, x]), torch.cat([t, t]), **self.model_kwargs,
                        **_cat_kwargs(kw_c, kw_u))
        o_c, o_u = out.chunk(2)
        return o_u + cond.guidance * (o_c - o_u)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "conditioning": self.conditioning.describe()}


# --------------------------------------------------------------------------- class-conditional UNets


def class_embeds(module: nn.Module) -> int | None:
    """``num_class_embeds`` of a diffusers UNet (None: not class-conditional)."""
    cfg = getattr(module, "config", None)
    return None if cfg is None else cfg.get("num_class_embeds")


def resolve_class_conditioning(cond: Conditioning | None, num_embeds: int, name: str,
                               null_class: int | None = None) -> Conditioning:
    """``cond`` checked against a model with ``num_embeds`` class embeddings; the null label is the
    last embedding unless ``null_class`` (or ``cond.null_label``) says otherwise; ``'all'`` becomes
    every label but the null one."""
    if cond is None:
        raise StepsmithError(f"{name} is class-conditional ({num_embeds} class embeddings): give the classes to "
                             "sample, e.g. --classes all --guidance 3 (Python: conditioning=Conditioning(labels=...))",
                             param="classes")
    if cond.kind != "class":
        raise StepsmithError(f"{name} is class-conditional: give class labels (--classes), not prompts",
                             param="prompts")
    null = null_class if null_class is not None else cond.null_label
    null = num_embeds - 1 if null is None else null
    if not 0 <= null < num_embeds or num_embeds < 2:
        raise StepsmithError(f"null class {null} is not one of the {num_embeds} class embeddings of {name} "
                             f"(0..{num_embeds - 1}); pass --null-class N", param="null_class")
    labels = tuple(v for v in range(num_embeds) if v != null) if cond.labels == "all" else cond.labels
    bad = [v for v in labels if not 0 <= v < num_embeds or v == null]
    if bad:
        raise StepsmithError(f"class label {bad[0]} is out of range for {name}: its classes are "
                             f"{', '.join(str(v) for v in range(num_embeds) if v != null)} (null class {null})",
                             param="classes")
    return Conditioning(labels=labels, null_label=null, guidance=cond.guidance, height=cond.height,
                        width=cond.width, extra=cond.extra)


def conditional_from(adapter: ModelAdapter, cond: Conditioning | None, null_class: int | None = None) -> ModelAdapter:
    """The loaded ``adapter`` as a :class:`ConditionalAdapter` when its network is class-conditional.

    An unconditional network given a conditioning is refused (one clear line), as is a conditional
    one given none.
    """
    n = class_embeds(adapter.module)
    if n is None:
        if cond is not None or null_class is not None:
            what = "class labels" if cond is None or cond.kind == "class" else "prompts"
            raise StepsmithError(f"{adapter.name} is an unconditional model; it takes no {what} or guidance — "
                                 "drop --classes / --prompts / --guidance", param="classes")
        return adapter
    cond = resolve_class_conditioning(cond, int(n), adapter.name, null_class)
    return ConditionalAdapter(module=adapter.module, convention=adapter.convention, prediction=adapter.prediction,
                              sample_shape=adapter.sample_shape, name=adapter.name,
                              scheduler_config=adapter.scheduler_config, call=adapter.call,
                              model_kwargs=adapter.model_kwargs, conditioning=cond)


def with_guidance(adapter: ModelAdapter, w: float) -> ModelAdapter:
    """A copy of a conditional ``adapter`` at guidance ``w`` (same network, same condition set).

    A pipeline adapter (``adapter.pipeline``) is rebuilt by its pipeline adapter under the conditioning at
    guidance ``w``: it keeps ``.pipeline`` (for decoding), and the builder decides what the scale means
    (Flux with a guidance embedding: the embedded value, not CFG)."""
    if not isinstance(adapter, ConditionalAdapter):
        raise StepsmithError(f"{adapter.name} is unconditional; guidance applies to conditional models only",
                             param="guidance")
    pipe = getattr(adapter, "pipeline", None)
    if pipe is not None:
        from schedules.pipeline_adapters import adapter_from_pipeline

        asked = getattr(adapter, "pipeline_conditioning", None) or adapter.conditioning  # as requested, not resolved
        return adapter_from_pipeline(pipe, asked.with_guidance(w), name=adapter.name,
                                     **getattr(adapter, "pipeline_options", {}))
    return ConditionalAdapter(module=adapter.module, convention=adapter.convention, prediction=adapter.prediction,
                              sample_shape=adapter.sample_shape, name=adapter.name,
                              scheduler_config=adapter.scheduler_config, call=adapter.call,
                              model_kwargs=adapter.model_kwargs, conditioning=adapter.conditioning.with_guidance(w),
                              condition_kwargs=adapter.condition_kwargs, guide_above_one=adapter.guide_above_one)


def conditioning_of(adapter) -> Conditioning | None:
    """The conditioning of a (possibly unconditional) denoiser."""
    return getattr(adapter, "conditioning", None)


def conditioning_record(cond: Conditioning | None) -> dict[str, Any] | None:
    """A JSON record of ``cond`` that :func:`conditioning_from_record` rebuilds it from (a distilled student's
    ``distill.json`` records the conditioning it was trained under this way; give it the conditioning as
    requested: ``distill.export.requested_conditioning``)."""
    if cond is None:
        return None
    rec: dict[str, Any] = {"guidance": cond.guidance, "height": cond.height, "width": cond.width}
    if cond.kind == "class":
        rec.update(classes=list(cond.items), null_class=cond.null_label)
    else:
        rec.update(prompts=list(cond.items), negative=cond.negative)
    return rec


def conditioning_from_record(rec: dict[str, Any] | None) -> Conditioning | None:
    """The :class:`Conditioning` of a :func:`conditioning_record` (None: unconditional)."""
    if rec is None:
        return None
    common = dict(guidance=rec["guidance"], height=rec.get("height"), width=rec.get("width"))
    if "classes" in rec:
        return Conditioning(labels=tuple(rec["classes"]), null_label=rec.get("null_class"), **common)
    return Conditioning(prompts=tuple(rec["prompts"]), negative=rec.get("negative"), **common)


__all__ = ["ConditionalAdapter", "Conditioning", "bind", "bound_indices", "class_label_kwargs", "conditional_from",
           "conditioning_from_record", "conditioning_mismatch", "conditioning_of", "conditioning_record",
           "micro_batches", "parse_classes", "resolve_class_conditioning", "warn_if_mismatch", "with_guidance"]
