"""CLIP score of text-to-image samples against their own prompts (Hessel et al. 2021, "CLIPScore").

For sample *i* generated for prompt *i mod P*, with CLIP image and text embeddings e_I, e_T::

    clip_i = max(100 · cos(e_I(image_i), e_T(prompt_{i mod P})), 0)

and the metric is the mean of ``clip_i`` over the samples (higher is better). The factor 100 and
the clamp at 0 are torchmetrics' ``CLIPScore`` convention (the paper's CLIP-S uses w = 2.5).

The CLIP network is a local ``transformers`` ``CLIPModel`` folder with its processor / tokenizer
(``save_pretrained`` output): it is never downloaded. torchmetrics' ``CLIPScore`` (1.9) is not used
because it refuses local folders (its loader accepts only the names of a few hub models, or a
callable), takes images and texts pairwise without the per-sample prompt index a sweep needs, and
offers no per-sample scores to gather across processes; the formula is the same.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schedules.io import StepsmithError

SCALE = 100.0


def check_clip_folder(path: str | os.PathLike | None) -> Path:
    """The local CLIP folder, checked before any model call (a clear error naming ``--clip-model``)."""
    if path is None:
        raise StepsmithError("`metric` clip needs a local CLIP network: pass --clip-model DIR (a transformers CLIPModel "
                             "folder with its processor and tokenizer, e.g. from CLIPModel.save_pretrained; stepsmith "
                             "never downloads weights)", param="clip_model")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise StepsmithError(f"--clip-model {folder} is not a transformers model folder (no config.json); give the "
                             "folder CLIPModel.save_pretrained and CLIPProcessor.save_pretrained wrote",
                             param="clip_model")
    return folder


@dataclass
class ClipScorer:
    """A loaded CLIP model + processor; :meth:`per_sample` scores images against prompts."""

    model: Any
    processor: Any
    name: str

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings of ``prompts`` (truncated to the text encoder's positions)."""
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len,
                                       return_tensors="pt")
        e = _projected(self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        return torch.nn.functional.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Unit-norm image embeddings of images in [0, 1], [N, 3, H, W] (as uint8 pixels through the processor)."""
        out = []
        for b in range(0, images.shape[0], batch_size):
            pixels = (images[b:b + batch_size].clamp(0, 1) * 255).round().to(torch.uint8)
            inputs = self.processor.image_processor(images=list(pixels), return_tensors="pt")
            out.append(_projected(self.model.get_image_features(pixel_values=inputs["pixel_values"])).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def per_sample(self, images: torch.Tensor, prompts: Sequence[str], prompt_index: torch.Tensor) -> torch.Tensor:
        """``max(100·cos(image_i, prompt_{index_i}), 0)`` per sample, float64 [N]."""
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64)
        if images.ndim != 4 or images.shape[1] != 3:
            raise StepsmithError(f"CLIP score takes RGB images [N, 3, H, W]; got {list(images.shape)}")
        t = self.text_embeddings(prompts)[prompt_index.long()]
        cos = (self.image_embeddings(images) * t).sum(-1)
        return (SCALE * cos).clamp_min(0).to(torch.float64)


def _projected(out: Any) -> torch.Tensor:
    """The projected embedding of ``get_text_features`` / ``get_image_features``: a tensor (transformers 4) or
    an output whose ``pooler_output`` is the projection (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(path: str | os.PathLike | None) -> ClipScorer:
    """The CLIP model and processor of a local folder (offline; a clear error when it cannot be loaded)."""
    folder = check_clip_folder(path)
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StepsmithError(f"cannot load a CLIP model and processor from --clip-model {folder}: {first}",
                             param="clip_model") from None
    return ClipScorer(model, processor, folder.name)


def clip_score(scorer: ClipScorer, images: torch.Tensor, prompts: Sequence[str],
               prompt_index: torch.Tensor | None = None) -> float:
    """Mean CLIP score of ``images`` (in [0, 1]) for their prompts (default: sample i ↔ prompt i mod P)."""
    idx = torch.arange(images.shape[0]) % len(prompts) if prompt_index is None else prompt_index
    return float(scorer.per_sample(images, prompts, idx).mean())


__all__ = ["ClipScorer", "SCALE", "check_clip_folder", "clip_score", "load_clip"]
