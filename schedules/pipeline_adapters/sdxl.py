"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two text encoders, pooled embeddings, time ids.

Encoded once with the pipeline's own ``encode_prompt``: ``prompt_embeds`` (both encoders'
penultimate hidden states, concatenated) are the UNet's ``encoder_hidden_states``, the pooled
embedding of the second encoder its ``added_cond_kwargs["text_embeds"]``. A missing negative
prompt is the pipeline's default: with ``force_zeros_for_empty_prompt`` (SDXL base) the negative
embeddings are zeros, else the empty prompt is encoded — ``encode_prompt`` decides, so the
negative branch is exactly the pipeline's. An explicit ``""`` is always encoded, so under
``force_zeros_for_empty_prompt`` "none" and ``""`` guide differently: the adapter's conditioning then
records ``extra["negative_embeds"] = "zeros"`` for "none" (in ``describe()`` and the fingerprint) when it
guides (w > 1); in every other case the two are the same conditioning and share a fingerprint.

The micro-conditioning ``time_ids`` come from the pipeline's ``_get_add_time_ids`` with its
defaults: original_size = target_size = (height, width), crops_coords_top_left = (0, 0) (Podell
et al. 2023, "SDXL", §2.2); the negative branch gets the same ids, as the pipeline does when no
negative sizes are given. The per-sample rows are picked from flat keys (``text_embeds``,
``time_ids``) and assembled into the UNet's nested ``added_cond_kwargs`` in :func:`unet_call`.
The input scaling and guidance are those of :mod:`schedules.pipeline_adapters.sd`.
"""

from __future__ import annotations

from typing import Any

import torch

from schedules.adapters import convention_from_scheduler_config
from schedules.conditioning import ConditionalAdapter, Conditioning
from schedules.pipeline_adapters.base import EncodedConditions, require_text_encoders
from schedules.pipeline_adapters.sd import (
    check_unet,
    image_size,
    latent_shape,
    prompt_conditioning,
    refuse_options,
    resolved,
    vae_scale_factor,
)

# the ``extra`` key (recorded by tables) of a negative branch of zeros
NEGATIVE_EMBEDS = "negative_embeds"


def unet_call(module, x: torch.Tensor, t: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
              text_embeds: torch.Tensor, time_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The SDXL UNet call: flat per-sample inputs → ``added_cond_kwargs``."""
    return module(x, t, encoder_hidden_states=encoder_hidden_states,
                  added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, **kwargs).sample


@torch.no_grad()
def add_time_ids(pipe, height: int, width: int, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The pipeline's default micro-conditioning (1 row): original = target size (h, w), crops (0, 0)."""
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    return pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                  text_encoder_projection_dim=proj)


@torch.no_grad()
def encode(pipe, conditioning: Conditioning, height: int, width: int) -> EncodedConditions:
    """Embeddings, pooled embeddings and time ids: P rows for the prompts, 1 for the negative branch."""
    device = pipe._execution_device
    prompts = list(conditioning.prompts)
    emb, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    _, neg, _, neg_pooled = pipe.encode_prompt(prompts[0], device=device, do_classifier_free_guidance=True,
                                               negative_prompt=conditioning.negative)
    ids = add_time_ids(pipe, height, width, pooled, emb.dtype).to(device)
    cond = {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": ids.repeat(len(prompts), 1)}
    uncond = {"encoder_hidden_states": neg[:1], "text_embeds": neg_pooled[:1], "time_ids": ids}
    return EncodedConditions(cond=cond, uncond=uncond)


def zero_negative(pipe, conditioning: Conditioning) -> bool:
    """Whether the guided negative branch is zeros, not the encoded "": no negative prompt under the pipeline's
    ``force_zeros_for_empty_prompt`` (``encode_prompt``'s ``zero_out_negative_prompt``), and w > 1."""
    forced = bool(dict(pipe.config).get("force_zeros_for_empty_prompt", False))
    return forced and conditioning.negative is None and conditioning.guidance > 1.0


def recorded_conditioning(pipe, conditioning: Conditioning, height: int, width: int) -> Conditioning:
    """The adapter's conditioning (:func:`~schedules.pipeline_adapters.sd.resolved`), recording a negative branch of
    zeros as ``extra["negative_embeds"]``."""
    cond = resolved(conditioning, height, width)
    extra = {k: v for k, v in cond.extra.items() if k != NEGATIVE_EMBEDS}
    if zero_negative(pipe, conditioning):
        extra[NEGATIVE_EMBEDS] = "zeros"
    return Conditioning(prompts=cond.prompts, negative=cond.negative, guidance=cond.guidance, height=cond.height,
                        width=cond.width, extra=extra)


def build(pipe, conditioning: Conditioning | None, *, name: str, **options: Any) -> ConditionalAdapter:
    """The :class:`ConditionalAdapter` of a ``StableDiffusionXLPipeline`` under ``conditioning`` (prompts)."""
    refuse_options(options, name)
    conditioning = prompt_conditioning(conditioning, name)
    require_text_encoders(pipe, name, ("text_encoder", "text_encoder_2"))  # the base model's two CLIP encoders
    check_unet(pipe.unet, name)
    height, width = image_size(pipe, conditioning, name, pipe.default_sample_size)
    encoded = encode(pipe, conditioning, height, width)
    conv, pred = convention_from_scheduler_config(dict(pipe.scheduler.config))
    adapter = ConditionalAdapter(module=pipe.unet.eval(), convention=conv, prediction=pred,
                                 sample_shape=latent_shape(pipe.unet, height, width, vae_scale_factor(pipe)), name=name,
                                 scheduler_config=dict(pipe.scheduler.config), call=unet_call,
                                 conditioning=recorded_conditioning(pipe, conditioning, height, width), condition_kwargs=encoded,
                                 guide_above_one=True)
    adapter.pipeline = pipe  # for decoding the latents (stepsmith sample)
    return adapter


__all__ = ["add_time_ids", "build", "encode", "recorded_conditioning", "unet_call", "zero_negative"]
