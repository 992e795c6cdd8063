"""DiT (``DiTPipeline``): a class-conditional latent transformer (Peebles & Xie 2023, "Scalable
Diffusion Models with Transformers").

The class labels are the transformer's ``num_embeds_ada_norm`` classes; the unconditional (null)
label is the extra embedding after them, ``num_embeds_ada_norm`` (1000 for the ImageNet models:
diffusers' ``DiTPipeline`` hard-codes ``class_null = 1000``); ``--null-class`` overrides it. The
network call is the pipeline's ``transformer(latents, timestep=t, class_labels=labels).sample``.

What ``DiTPipeline.__call__`` does with the output, reproduced exactly:

* guidance ``eps = uncond + w·(cond − uncond)`` is applied to the first ``in_channels`` output
  channels (``noise_pred[:, :latent_channels]``; the original DiT code, and older diffusers,
  guided only the first 3 channels — this diffusers version guides all latent channels);
* a learned-sigma model (``out_channels == 2·in_channels``) then keeps the first half (the ε
  prediction; the variance half is only used by DDPM's ``learned_range`` sampling, and stepsmith's
  deterministic solvers do not use it).

So the adapter's network output is the first ``in_channels`` channels, which the guided adapter
combines. The pipeline feeds ``scheduler.scale_model_input(latents, t)`` (identity for DDIM /
DPM-Solver, the VP state), which is what stepsmith feeds the network; the pipeline draws its latents
with ``randn`` unscaled (no ``init_noise_sigma``). The pipeline guides only when w > 1 (0 ≤ w ≤ 1: the
conditional branch alone), and so does the adapter (``guide_above_one``). DiT samples one size
(``transformer.config.sample_size`` latents): a different height / width is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from schedules.adapters import convention_from_scheduler_config
from schedules.conditioning import ConditionalAdapter, Conditioning, class_label_kwargs, resolve_class_conditioning
from schedules.io import StepsmithError
from schedules.pipeline_adapters.sd import refuse_options, vae_scale_factor


def transformer_call(module, x: torch.Tensor, t: torch.Tensor, *, class_labels: torch.Tensor,
                     **kwargs: Any) -> torch.Tensor:
    """The DiT call, keeping the first ``in_channels`` output channels (the ε half of a learned-sigma output)."""
    out = module(x, timestep=t, class_labels=class_labels, **kwargs).sample
    return out[:, : x.shape[1]]


def class_conditioning(conditioning: Conditioning | None, transformer, name: str,
                       null_class: int | None) -> Conditioning:
    """Class labels checked against the transformer's ``num_embeds_ada_norm`` classes (+ the null label)."""
    if conditioning is not None and conditioning.kind != "class":
        raise StepsmithError(f"{name} is class-conditional: give class labels (--classes), not prompts",
                             param="prompts")
    n = transformer.config.get("num_embeds_ada_norm")
    if n is None:
        raise StepsmithError(f"{name}: its transformer has no num_embeds_ada_norm (not class-conditional)")
    if conditioning is None:
        raise StepsmithError(f"{name} is class-conditional ({n} classes): give the classes to sample, e.g. "
                             "--classes 0,1 --guidance 4 (Python: conditioning=Conditioning(labels=...))",
                             param="classes")
    return resolve_class_conditioning(conditioning, int(n) + 1, name, null_class)


def image_size(pipe, conditioning: Conditioning, name: str) -> tuple[int, int]:
    """DiT's one image size: ``sample_size · vae_scale_factor``; another height / width is refused."""
    size = pipe.transformer.config.sample_size * vae_scale_factor(pipe)
    for what, v in (("height", conditioning.height), ("width", conditioning.width)):
        if v is not None and v != size:
            raise StepsmithError(f"{name} samples {size}×{size} images only (its transformer's sample_size); "
                                 f"`{what}` {v!r} differs — drop it", param=what)
    return size, size


def build(pipe, conditioning: Conditioning | None, *, name: str, null_class: int | None = None,
          **options: Any) -> ConditionalAdapter:
    """The :class:`ConditionalAdapter` of a ``DiTPipeline`` under ``conditioning`` (class labels)."""
    refuse_options(options, name)
    tr = pipe.transformer
    cond = class_conditioning(conditioning, tr, name, null_class)
    height, width = image_size(pipe, cond, name)
    cond = Conditioning(labels=cond.labels, null_label=cond.null_label, guidance=cond.guidance, height=height,
                        width=width, extra=cond.extra)
    conv, pred = convention_from_scheduler_config(dict(pipe.scheduler.config))
    latent = int(tr.config.sample_size)
    adapter = ConditionalAdapter(module=tr.eval(), convention=conv, prediction=pred,
                                 sample_shape=(int(tr.config.in_channels), latent, latent), name=name,
                                 scheduler_config=dict(pipe.scheduler.config), call=transformer_call,
                                 conditioning=cond, condition_kwargs=class_label_kwargs,
                                 guide_above_one=True)
    adapter.pipeline = pipe  # for decoding the latents (stepsmith sample)
    return adapter


__all__ = ["build", "class_conditioning", "transformer_call"]
