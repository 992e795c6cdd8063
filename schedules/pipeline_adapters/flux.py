"""Flux (``FluxPipeline``): a FluxTransformer2DModel on PACKED VAE latents.

**Sample shape.** The pipeline packs its latents [C, h, w] (h = 2·⌊H / 2f⌋, f = ``vae_scale_factor``)
into 2×2 patches, [(h/2)·(w/2), 4C], and runs its whole loop on that packed tensor; the adapter's
``sample_shape`` is the packed shape, so stepsmith's noise is exactly the ``latents=`` the pipeline
takes and the final state is the pipeline's ``output_type="latent"`` result (``pipe._unpack_latents``
turns it back into [C, h, w] for the VAE).

**The network call** is the pipeline's ``transformer(hidden_states=x, timestep=t/1000,
guidance=..., pooled_projections=..., encoder_hidden_states=..., txt_ids=..., img_ids=...)``:
the FlowMatch scheduler's timestep t = σ·1000 divided by 1000, i.e. the transformer sees σ
(rectified flow, x_σ = (1-σ)·x0 + σ·ε, velocity prediction ε − x0 = stepsmith's ``flow``).
``txt_ids`` and ``img_ids`` are the same for every sample and sit in ``model_kwargs``; the T5
``prompt_embeds`` and CLIP ``pooled_prompt_embeds`` are encoded once by ``encode_prompt``.

**Guidance.** FluxPipeline has no classifier-free guidance by default:

* guidance-distilled models (dev; ``transformer.config.guidance_embeds``): the Conditioning's
  ``guidance`` is the *embedded* guidance value the transformer takes as its ``guidance`` input
  (the pipeline's ``guidance_scale``). One call per evaluation, no doubled batch: the adapter's
  conditioning has CFG scale ``true_cfg_scale`` (default 1) and records the embedded value as
  ``extra["distilled_guidance"]`` — in its ``describe()`` and fingerprint too (``Conditioning.recorded``), so a table searched
  at guidance 3.5 says so (``conditioning.distilled_guidance``) and is told apart from one at 2.
  ``true_cfg_scale=w`` (with a negative prompt) adds true CFG on top, as the pipeline's option.
* models without a guidance embedding (schnell): guidance w > 1 with a negative prompt is the
  pipeline's ``true_cfg_scale`` CFG, ``neg + w·(pos − neg)`` (Ho & Salimans 2022) — the pipeline
  makes two calls, stepsmith one batched call of the same inputs. There is no default negative
  prompt (the pipeline has none): w > 1 without one is refused. For 0 ≤ w ≤ 1 the pipeline runs no true
  CFG (``do_true_cfg = true_cfg_scale > 1``), and neither does the adapter (``guide_above_one``).

**Resolution.** The pipeline's default schedule depends on the image: the dynamic shift
μ = calculate_shift(image sequence length) (Esser et al. 2024 resolution-dependent shifting). It
concerns the schedule only, never the network call; a table holds the σ the transformer really
sees, so the adapter records μ (``extra["mu"]``, ``extra["image_seq_len"]``) for the table to say
which resolution it was searched at.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from schedules.conditioning import ConditionalAdapter, Conditioning
from schedules.io import StepsmithError
from schedules.pipeline_adapters.base import EncodedConditions, check_size, require_text_encoders
from schedules.pipeline_adapters.flow import call_default, dynamic_mu, flow_convention, sequence_length
from schedules.pipeline_adapters.sd import prompt_conditioning, refuse_options, vae_scale_factor


def transformer_call(module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The Flux denoiser call, as the pipeline makes it: ``timestep = t.to(latents.dtype) / 1000`` (= σ)."""
    return module(hidden_states=x, timestep=t.to(x.dtype) / 1000, return_dict=False, **kwargs)[0]


def image_size(pipe, conditioning: Conditioning, name: str) -> tuple[int, int]:
    """(height, width) in pixels: the conditioning's, else the pipeline default ``default_sample_size · f``;
    a multiple of 2f (the pipeline resizes other sizes; stepsmith refuses them)."""
    f = vae_scale_factor(pipe)
    default = int(getattr(pipe, "default_sample_size", 128)) * f
    height = conditioning.height if conditioning.height is not None else default
    width = conditioning.width if conditioning.width is not None else default
    return check_size(height, width, 2 * f, name)


def packed_shape(pipe, height: int, width: int) -> tuple[int, int]:
    """The packed latent shape [(h/2)·(w/2), 4C] of one sample (the pipeline's ``prepare_latents``)."""
    f = vae_scale_factor(pipe)
    h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
    c = int(pipe.transformer.config.in_channels) // 4
    return (h // 2) * (w // 2), 4 * c


def _scale(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or float(v) < 0:
        raise StepsmithError(f"`{what}` must be a finite number ≥ 0 (1 = none), got {v!r}", param=what)
    return float(v)


def guidance_plan(pipe, conditioning: Conditioning, name: str, true_cfg_scale: Any) -> tuple[float, float | None]:
    """(CFG scale of the adapter, embedded guidance value or None) — see the module docstring."""
    distilled = bool(pipe.transformer.config.get("guidance_embeds", False))
    if not distilled:
        if true_cfg_scale is not None:
            raise StepsmithError(f"{name} has no guidance embedding: its guidance IS true CFG — give it as `guidance`, "
                                 "not `true_cfg_scale`", param="true_cfg_scale")
        cfg_scale = conditioning.guidance
    else:
        cfg_scale = 1.0 if true_cfg_scale is None else _scale(true_cfg_scale, "true_cfg_scale")
    if cfg_scale > 1.0 and conditioning.negative is None:
        what = "`guidance`" if not distilled else "`true_cfg_scale`"  # backticked names become CLI flags there
        raise StepsmithError(f"{name}: true CFG ({what} {cfg_scale:g}) needs a negative prompt (`negative_prompt`; "
                             "Python: Conditioning(negative=...)); FluxPipeline has no default one"
                             + ("" if distilled else " — or use guidance 1"), param="negative_prompt")
    return cfg_scale, (conditioning.guidance if distilled else None)


@torch.no_grad()
def encode(pipe, conditioning: Conditioning, max_len: int, guided: bool,
           embedded: float | None) -> tuple[EncodedConditions, torch.Tensor]:
    """Per-condition inputs (P rows; the negative prompt's 1 row when ``guided``) and the shared ``txt_ids``."""
    device = pipe._execution_device
    pe, pooled, text_ids = pipe.encode_prompt(prompt=list(conditioning.prompts), prompt_2=None, device=device,
                                              num_images_per_prompt=1, max_sequence_length=max_len)
    cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
    uncond = None
    if guided:
        npe, npooled, neg_ids = pipe.encode_prompt(prompt=[conditioning.negative], prompt_2=None, device=device,
                                                   num_images_per_prompt=1, max_sequence_length=max_len)
        if not torch.equal(neg_ids, text_ids):
            raise StepsmithError("the negative prompt's txt_ids differ from the prompts' (another sequence length?)")
        uncond = {"encoder_hidden_states": npe[:1], "pooled_projections": npooled[:1]}
    if embedded is not None:  # the pipeline's torch.full([1], guidance_scale, dtype=float32).expand(B)
        cond["guidance"] = torch.full((pe.shape[0],), embedded, device=device, dtype=torch.float32)
        if uncond is not None:
            uncond["guidance"] = torch.full((1,), embedded, device=device, dtype=torch.float32)
    return EncodedConditions(cond=cond, uncond=uncond), text_ids


def build(pipe, conditioning: Conditioning | None, *, name: str, max_sequence_length: int | None = None,
          true_cfg_scale: float | None = None, **options: Any) -> ConditionalAdapter:
    """The :class:`ConditionalAdapter` of a ``FluxPipeline`` under ``conditioning`` (prompts).

    ``sample_shape`` is the packed latent shape; the adapter's conditioning records the image size,
    the embedded guidance (distilled models) and the dynamic-shift μ of the resolution.
    """
    refuse_options(options, name)
    conditioning = prompt_conditioning(conditioning, name)
    require_text_encoders(pipe, name, ("text_encoder", "text_encoder_2"))  # CLIP (pooled) and T5
    max_len = sequence_length(pipe, max_sequence_length, name, 512)
    height, width = image_size(pipe, conditioning, name)
    cfg_scale, embedded = guidance_plan(pipe, conditioning, name, true_cfg_scale)
    shape = packed_shape(pipe, height, width)
    guided = cfg_scale > 1.0  # the pipeline's do_true_cfg (with a negative prompt)
    encoded, text_ids = encode(pipe, conditioning, max_len, guided, embedded)
    f = vae_scale_factor(pipe)
    img_ids = pipe._prepare_latent_image_ids(1, height // (2 * f), width // (2 * f), pipe._execution_device,
                                             text_ids.dtype)
    conv, pred, sched = flow_convention(pipe, name, "Flux")
    extra = {**conditioning.extra, **dynamic_mu(sched, shape[0]), "max_sequence_length": max_len}  # T5 padding is attended
    if embedded is not None:
        extra["distilled_guidance"] = embedded
    cond = Conditioning(prompts=conditioning.prompts, negative=conditioning.negative, guidance=cfg_scale,
                        height=height, width=width, extra=extra)
    adapter = ConditionalAdapter(module=pipe.transformer.eval(), convention=conv, prediction=pred, sample_shape=shape,
                                 name=name, scheduler_config=sched, call=transformer_call,
                                 model_kwargs={"txt_ids": text_ids, "img_ids": img_ids}, conditioning=cond,
                                 condition_kwargs=encoded, guide_above_one=True)
    adapter.pipeline = pipe  # for decoding: the packed latents unpacked to [C, h, w] first, as the pipeline does
    adapter.unpack_latents = functools.partial(pipe._unpack_latents, height=height, width=width, vae_scale_factor=f)
    return adapter


# the FlowMatch helpers live in schedules.pipeline_adapters.flow (shared with SD3); re-exported here for old imports
__all__ = ["build", "call_default", "dynamic_mu", "encode", "flow_convention",
           "guidance_plan", "image_size", "packed_shape", "sequence_length", "transformer_call"]
