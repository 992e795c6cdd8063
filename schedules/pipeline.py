"""``UnconditionalFlowMatchPipeline``: a diffusers pipeline for unconditional flow-matching UNets.

The embedded ``builtin:digits-flow`` folder is one of these (``model_index.json`` names the
class)::

    from schedules.pipeline import UnconditionalFlowMatchPipeline
    pipe = UnconditionalFlowMatchPipeline.from_pretrained("schedules/embedded/digits-flow")
    images = pipe(batch_size=4, num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images
    images = pipe(batch_size=4, sigmas=[1.0, 0.6, 0.3, 0.1]).images           # like SD3
    images = pipe(batch_size=4, **pipeline_kwargs(table, pipe)).images      # a stepsmith table

Conventions (diffusers FlowMatch, as SD3/Flux): x_σ = (1-σ)·x0 + σ·ε, the UNet receives
``timestep = σ·num_train_timesteps`` (σ·1000) and predicts the velocity ε - x0; sampling
runs from σ=1 (noise) to 0 with ``pipe.scheduler`` (FlowMatchEulerDiscreteScheduler, shift 1).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from schedules.io import StepsmithError


def _retrieve_timesteps(scheduler, num_inference_steps, device, timesteps=None, sigmas=None, **kwargs):
    """Set the scheduler's schedule from a step count, custom ``timesteps`` or custom ``sigmas``."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass only one of `timesteps` or `sigmas`")
    params = set(inspect.signature(scheduler.set_timesteps).parameters)
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    if timesteps is not None or sigmas is not None:
        key, val = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
        if key not in params:
            raise ValueError(f"{type(scheduler).__name__}.set_timesteps takes no custom `{key}`; use another scheduler")
        scheduler.set_timesteps(device=device, **{key: val}, **kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps, len(scheduler.timesteps)


class UnconditionalFlowMatchPipeline(DiffusionPipeline):
    """Unconditional image generation with a flow-matching ``UNet2DModel``.

    Components: ``unet`` (called as ``unet(x, σ·1000).sample``, predicting ε - x0) and
    ``scheduler`` (any scheduler with ``step``; FlowMatchEulerDiscreteScheduler by default).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        cfg = self.unet.config
        size = cfg.sample_size
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (batch_size, cfg.in_channels, *hw)

    def _initial_latents(self, batch_size, generator, latents, device, dtype) -> torch.Tensor:
        shape = self._sample_shape(batch_size)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise StepsmithError(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
        return latents.to(device=device, dtype=dtype)

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        """The final state as ``output_type``: the raw latents, or images in [0, 1] (pt / np / pil)."""
        if output_type == "latent":
            return latents
        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(np.asarray(image)) if output_type == "pil" else image

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 28,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        mu: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate ``batch_size`` images.

        Args:
            num_inference_steps: steps of the scheduler's default schedule.
            timesteps / sigmas: a custom schedule passed to ``scheduler.set_timesteps``
                (FlowMatch: N sigmas, 0 appended, the scheduler's ``shift`` applied — use
                :func:`schedules.diffusers.pipeline_kwargs` to pass a table exactly).
            generator: torch generator(s) for the initial noise.
            latents: initial noise (overrides ``generator``), shape [B, C, H, W].
            mu: dynamic-shifting parameter, for schedulers configured with it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"``
                (the raw final state, in the model's [-1, 1] range).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise StepsmithError(f"output_type {output_type!r}: use pil, np, pt or latent")
        device = self._execution_device
        dtype = self.unet.dtype
        latents = self._initial_latents(batch_size, generator, latents, device, dtype)
        extra = {}
        if self.scheduler.config.get("use_dynamic_shifting"):
            if mu is None:
                raise StepsmithError("the scheduler uses dynamic shifting: pass mu=")
            extra["mu"] = mu
        timesteps, _ = _retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas, **extra)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self._num_timesteps = len(timesteps)
        for t in self.progress_bar(timesteps):
            model_in = self.scheduler.scale_model_input(latents, t) if hasattr(self.scheduler, "scale_model_input") \
                else latents
            t_b = t.to(device=device, dtype=torch.float32).expand(latents.shape[0]) if isinstance(t, torch.Tensor) \
                else torch.full((latents.shape[0],), float(t), device=device)
            velocity = self.unet(model_in, t_b).sample
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
        self.maybe_free_model_hooks()
        image = self._postprocess(latents, output_type)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
