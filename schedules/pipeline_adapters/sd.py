"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): a UNet2DConditionModel on VAE latents.

The prompts are encoded once with the pipeline's own ``encode_prompt`` (the positives with
``do_classifier_free_guidance=False``; the negative branch separately, one row: a missing
negative prompt is the pipeline's default, the empty prompt ""). Every network call is the
pipeline's ``unet(latent_model_input, t, encoder_hidden_states=...).sample``.

The pipeline's UNet input is ``scheduler.scale_model_input(latents, t)``: for Euler-type
schedulers the latents are the EDM state y = x0 + σ·ε and the input y / sqrt(σ² + 1); for DDIM
the latents are already x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε. Both are the VP state stepsmith's
:class:`~schedules.adapters.ModelAdapter` feeds the network (x = α(σ)·(x0 + σ·ε), α = 1/sqrt(1+σ²)),
so the network receives the same tensor without any rescaling here. The guided output is
o_u + w·(o_c − o_u), the pipeline's ``noise_pred_uncond + guidance_scale·(noise_pred_text −
noise_pred_uncond)`` (Ho & Salimans 2022), applied as the pipeline does only for w > 1 (0 ≤ w ≤ 1: the
conditional branch alone, ``guide_above_one``), and ``guidance_rescale`` (Lin et al. 2023) is not applied (the pipeline's default is 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from schedules.adapters import convention_from_scheduler_config
from schedules.conditioning import ConditionalAdapter, Conditioning
from schedules.io import StepsmithError
from schedules.pipeline_adapters.base import EncodedConditions, check_size, require_text_encoders

# SD / SDXL ``check_inputs`` refuse a height or width that is not a multiple of 8 (whatever the VAE factor)
PIPELINE_SIZE_MULTIPLE = 8


def prompt_conditioning(conditioning: Conditioning | None, name: str) -> Conditioning:
    """``conditioning`` checked for a text-to-image pipeline: prompts, not class labels."""
    if conditioning is None:
        raise StepsmithError(f"{name} is a text-to-image pipeline: give the prompts to sample, e.g. --prompts "
                             "prompts.txt --guidance 7.5 (Python: conditioning=Conditioning(prompts=[...]))",
                             param="prompts")
    if conditioning.kind != "prompt":
        raise StepsmithError(f"{name} is a text-to-image pipeline: give prompts (--prompts), not class labels",
                             param="classes")
    return conditioning


# who takes the options a prompt pipeline refuses (the error says where they belong)
OPTION_OWNERS = {"null_class": " (it is conditioned on prompts, not class labels)",
                 "max_sequence_length": " (only SD3 and Flux pipelines encode prompts with T5)",
                 "true_cfg_scale": " (only Flux with a guidance embedding has a true CFG apart from its guidance)"}


def refuse_options(options: dict[str, Any], name: str) -> None:
    """Options a pipeline adapter does not take (e.g. ``null_class`` for prompts) are refused, not ignored."""
    bad = sorted(k for k, v in options.items() if v is not None)
    if bad:
        listed = ", ".join(f"`{k}`{OPTION_OWNERS.get(k, '')}" for k in bad)
        raise StepsmithError(f"{name} takes no {listed}", param=bad[0])


def vae_scale_factor(pipe) -> int:
    """The pipeline's VAE down-sampling factor (``pipe.vae_scale_factor``, else from the VAE config)."""
    f = getattr(pipe, "vae_scale_factor", None)
    if f is None:
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(f)


def image_size(pipe, conditioning: Conditioning, name: str, sample_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels: the conditioning's, else the pipeline default ``sample_size · vae_scale_factor``;
    checked to be a multiple of the VAE factor and of the pipeline's own multiple of 8."""
    f = vae_scale_factor(pipe)
    hw = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
    height = conditioning.height if conditioning.height is not None else int(hw[0]) * f
    width = conditioning.width if conditioning.width is not None else int(hw[1]) * f
    return check_size(height, width, math.lcm(f, PIPELINE_SIZE_MULTIPLE), name)


def resolved(conditioning: Conditioning, height: int, width: int) -> Conditioning:
    """The adapter's conditioning: the negative branch always exists ("" = the pipeline's default when none
    was given) and the image size is recorded."""
    return Conditioning(prompts=conditioning.prompts, negative="" if conditioning.negative is None else conditioning.negative,
                        guidance=conditioning.guidance, height=height, width=width, extra=conditioning.extra)


def check_unet(unet, name: str) -> None:
    if unet.config.get("time_cond_proj_dim") is not None:
        raise StepsmithError(f"{name}: its UNet takes a guidance embedding (time_cond_proj_dim, a distilled LCM-style "
                             "model); stepsmith's pipeline adapters do not support it yet")


def latent_shape(unet, height: int, width: int, factor: int) -> tuple[int, int, int]:
    return (int(unet.config.in_channels), height // factor, width // factor)


@torch.no_grad()
def encode(pipe, conditioning: Conditioning) -> EncodedConditions:
    """Prompt embeddings (P rows) and the negative ones (1 row), by the pipeline's ``encode_prompt``."""
    device = pipe._execution_device
    cond, _ = pipe.encode_prompt(list(conditioning.prompts), device, 1, False)
    _, uncond = pipe.encode_prompt(conditioning.prompts[0], device, 1, True,
                                   negative_prompt=conditioning.negative)
    return EncodedConditions(cond={"encoder_hidden_states": cond}, uncond={"encoder_hidden_states": uncond[:1]})


def build(pipe, conditioning: Conditioning | None, *, name: str, **options: Any) -> ConditionalAdapter:
    """The :class:`ConditionalAdapter` of a ``StableDiffusionPipeline`` under ``conditioning`` (prompts)."""
    refuse_options(options, name)
    conditioning = prompt_conditioning(conditioning, name)
    require_text_encoders(pipe, name, ("text_encoder",))
    check_unet(pipe.unet, name)
    height, width = image_size(pipe, conditioning, name, pipe.unet.config.sample_size)
    encoded = encode(pipe, conditioning)
    conv, pred = convention_from_scheduler_config(dict(pipe.scheduler.config))
    adapter = ConditionalAdapter(module=pipe.unet.eval(), convention=conv, prediction=pred,
                                 sample_shape=latent_shape(pipe.unet, height, width, vae_scale_factor(pipe)), name=name,
                                 scheduler_config=dict(pipe.scheduler.config),
                                 conditioning=resolved(conditioning, height, width), condition_kwargs=encoded,
                                 guide_above_one=True)
    adapter.pipeline = pipe  # for decoding the latents (stepsmith sample)
    return adapter


__all__ = ["build", "encode", "image_size", "prompt_conditioning", "vae_scale_factor"]
