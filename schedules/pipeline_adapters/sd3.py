"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): an SD3Transformer2DModel (MMDiT) on VAE latents.

The prompts are encoded once with the pipeline's own ``encode_prompt`` (the positives with
``do_classifier_free_guidance=False``; the negative branch separately, one row — a missing negative
prompt is the pipeline's default, the empty prompt ""): ``prompt_embeds`` (CLIP-L ⊕ CLIP-G padded,
then T5) become ``encoder_hidden_states`` and ``pooled_prompt_embeds`` become ``pooled_projections``.

Every network call is the pipeline's ``transformer(hidden_states=x, timestep=t,
encoder_hidden_states=..., pooled_projections=..., return_dict=False)[0]`` with t = σ·1000 (the
FlowMatch scheduler's timesteps, num_train_timesteps·σ). Rectified flow (Esser et al. 2024,
"Scaling Rectified Flow Transformers"): x_σ = (1-σ)·x0 + σ·ε and the transformer predicts the
velocity ε − x0, stepsmith's ``flow`` prediction; the latents are the pipeline's unpacked
[C, H/f, W/f] latents. The σ a table holds is the σ the transformer sees (shift already applied;
``pipeline_kwargs`` undoes the scheduler's shift when it plugs a table in). Guidance is
o_u + w·(o_c − o_u) in one batched call, the pipeline's ``noise_pred_uncond + guidance_scale·
(noise_pred_text − noise_pred_uncond)`` (Ho & Salimans 2022), applied as the pipeline does only for
w > 1 (0 ≤ w ≤ 1: the conditional branch alone, ``guide_above_one``), and skip-layer guidance is not
applied (the pipeline's default is off).
"""

from __future__ import annotations

from typing import Any

import torch

from schedules.conditioning import ConditionalAdapter, Conditioning
from schedules.pipeline_adapters.base import EncodedConditions, check_size, require_text_encoders
from schedules.pipeline_adapters.flow import dynamic_mu, flow_convention, sequence_length
from schedules.pipeline_adapters.sd import prompt_conditioning, refuse_options, vae_scale_factor


def transformer_call(module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The SD3 denoiser call: keyword inputs (its second positional argument is not the timestep)."""
    return module(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]


def image_size(pipe, conditioning: Conditioning, name: str) -> tuple[int, int]:
    """(height, width) in pixels: the conditioning's, else the pipeline default ``default_sample_size · f``;
    a multiple of ``f · patch_size`` (the pipeline's ``check_inputs``)."""
    f = vae_scale_factor(pipe)
    default = int(getattr(pipe, "default_sample_size", None) or pipe.transformer.config.sample_size) * f
    height = conditioning.height if conditioning.height is not None else default
    width = conditioning.width if conditioning.width is not None else default
    return check_size(height, width, f * int(pipe.transformer.config.patch_size), name)


@torch.no_grad()
def encode(pipe, conditioning: Conditioning, max_len: int) -> EncodedConditions:
    """Prompt and pooled embeddings (P rows) and the negative ones (1 row), by the pipeline's ``encode_prompt``."""
    device = pipe._execution_device
    pe, _, pooled, _ = pipe.encode_prompt(prompt=list(conditioning.prompts), prompt_2=None, prompt_3=None, device=device,
                                          num_images_per_prompt=1, do_classifier_free_guidance=False,
                                          max_sequence_length=max_len)
    _, npe, _, npooled = pipe.encode_prompt(prompt=list(conditioning.prompts[:1]), prompt_2=None, prompt_3=None,
                                            device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                                            negative_prompt=conditioning.negative, max_sequence_length=max_len)
    return EncodedConditions(cond={"encoder_hidden_states": pe, "pooled_projections": pooled},
                             uncond={"encoder_hidden_states": npe[:1], "pooled_projections": npooled[:1]})


def build(pipe, conditioning: Conditioning | None, *, name: str, max_sequence_length: int | None = None,
          **options: Any) -> ConditionalAdapter:
    """The :class:`ConditionalAdapter` of a ``StableDiffusion3Pipeline`` under ``conditioning`` (prompts).

    The adapter's conditioning records the image size, the negative prompt ("" when none was given)
    and, for a scheduler with dynamic shifting, the pipeline's μ at this resolution (``extra["mu"]``).
    """
    refuse_options(options, name)
    conditioning = prompt_conditioning(conditioning, name)
    require_text_encoders(pipe, name, ("text_encoder", "text_encoder_2"), optional=("text_encoder_3",))  # no T5: zeros
    max_len = sequence_length(pipe, max_sequence_length, name, 256)
    height, width = image_size(pipe, conditioning, name)
    f, p = vae_scale_factor(pipe), int(pipe.transformer.config.patch_size)
    shape = (int(pipe.transformer.config.in_channels), height // f, width // f)
    encoded = encode(pipe, conditioning, max_len)
    conv, pred, cfg = flow_convention(pipe, name, "SD3")
    extra = {**conditioning.extra, "max_sequence_length": max_len}  # T5 padding is attended: part of the call
    if cfg.get("use_dynamic_shifting"):
        extra.update(dynamic_mu(cfg, (shape[1] // p) * (shape[2] // p)))
    cond = Conditioning(prompts=conditioning.prompts,
                        negative="" if conditioning.negative is None else conditioning.negative,
                        guidance=conditioning.guidance, height=height, width=width, extra=extra)
    adapter = ConditionalAdapter(module=pipe.transformer.eval(), convention=conv, prediction=pred, sample_shape=shape,
                                 name=name, scheduler_config=cfg, call=transformer_call, conditioning=cond,
                                 condition_kwargs=encoded, guide_above_one=True)
    adapter.pipeline = pipe  # for decoding the latents (stepsmith sample)
    return adapter


__all__ = ["build", "encode", "image_size", "transformer_call"]
