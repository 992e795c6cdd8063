"""What every pipeline adapter shares: conditions encoded once, rows picked per sample.

A pipeline adapter turns a diffusers pipeline plus a :class:`~schedules.conditioning.Conditioning`
into a :class:`~schedules.conditioning.ConditionalAdapter` whose network call is exactly the
pipeline's own denoiser call. The conditions (prompt embeddings, pooled embeddings, class labels)
are encoded ONCE with the pipeline's own encoder (``encode_prompt``) into tensors with one row per
condition (P rows) and one row for the negative branch; every network call then picks the rows of
the samples it holds (sample *i* → condition *i mod P*), so micro-batching never re-encodes and
never misaligns a condition with its noise.

Inputs that are the same for every sample (Flux's ``txt_ids`` / ``img_ids``, SDXL's crop
coordinates when shared) belong in the adapter's ``model_kwargs`` instead: they are not
concatenated for the guided batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from schedules.conditioning import Conditioning
from schedules.io import StepsmithError


@dataclass(frozen=True)
class EncodedConditions:
    """Per-condition network inputs: ``cond[k]`` has P rows, ``uncond[k]`` one row (or None).

    Called as ``condition_kwargs(cond, sample_indices, uncond, device)`` by
    :class:`~schedules.conditioning.ConditionalAdapter`.
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        rows = {int(v.shape[0]) for v in self.cond.values()}
        if len(rows) != 1:
            raise StepsmithError(f"encoded conditions disagree on the number of conditions: {sorted(rows)}")
        if self.uncond is not None:
            if set(self.uncond) != set(self.cond):
                raise StepsmithError("the negative branch must encode the same inputs as the conditions: "
                                     f"{sorted(self.uncond)} vs {sorted(self.cond)}")
            if any(int(v.shape[0]) != 1 for v in self.uncond.values()):
                raise StepsmithError("the negative branch is one row per input")

    @property
    def size(self) -> int:
        return int(next(iter(self.cond.values())).shape[0])

    def __call__(self, cond: Conditioning, sample_indices: torch.Tensor, uncond: bool,
                 device: torch.device) -> dict[str, Any]:
        if uncond:
            if self.uncond is None:
                raise StepsmithError("guidance needs the negative branch, which was not encoded")
            src, rows = self.uncond, torch.zeros(len(sample_indices), dtype=torch.long)
        else:
            src, rows = self.cond, cond.condition_index(sample_indices)
        return {k: v.index_select(0, rows.to(v.device)).to(device) for k, v in src.items()}


def check_size(height: int | None, width: int | None, factor: int, name: str) -> tuple[int, int]:
    """``height`` / ``width`` (pixels) checked against the VAE factor (and the patch size folded in)."""
    if height is None or width is None:
        raise StepsmithError(f"{name}: give --height and --width (pixels)", param="height")
    for what, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % factor:
            raise StepsmithError(f"`{what}` {v!r} of {name} must be a positive multiple of {factor} "
                                 "(the VAE factor times the patch size)", param=what)
    return int(height), int(width)


def require_text_encoders(pipe, name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Refuse, up front, a pipeline that cannot encode prompts: a ``text_encoder*`` of ``required`` (or its
    tokenizer) is None — e.g. loaded with ``text_encoder=None`` or saved without it. An ``optional`` encoder
    (SD3's T5, which the pipeline replaces by zeros) may be None, but not its tokenizer alone."""
    for enc in (*required, *optional):
        tok = enc.replace("text_encoder", "tokenizer")
        has_enc, has_tok = getattr(pipe, enc, None) is not None, getattr(pipe, tok, None) is not None
        if enc in optional and not has_enc:
            continue
        missing = enc if not has_enc else tok if not has_tok else None
        if missing is not None:
            raise StepsmithError(
                f"{name} has no {missing} (saved or loaded without it, e.g. {missing}=None), so it cannot encode "
                f"prompts: use a pipeline folder with its {missing}, or in Python pass precomputed prompt embeddings "
                "— a ConditionalAdapter with condition_kwargs=EncodedConditions(cond=..., uncond=...) "
                "(schedules.pipeline_adapters.base)", param="prompts")


__all__ = ["EncodedConditions", "check_size", "require_text_encoders"]
