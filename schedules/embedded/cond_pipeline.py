"""``ClassConditionalFlowMatchPipeline``: diffusers pipeline of the class-conditional ``builtin:digits-cond``.

::

    from schedules.embedded.cond_pipeline import ClassConditionalFlowMatchPipeline
    pipe = ClassConditionalFlowMatchPipeline.from_pretrained(embedded_path("digits-cond"))
    images = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, num_inference_steps=8).images
    images = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, **pipeline_kwargs(table, pipe)).images

The UNet (``num_class_embeds`` = 11: digits 0-9 and the null label 10, trained with label dropout)
is called as ``unet(x, σ·1000, class_labels=y).sample`` and predicts the velocity ε − x0, as in
:class:`schedules.pipeline.UnconditionalFlowMatchPipeline`. Classifier-free guidance (Ho & Salimans
2022) runs the conditional and null-label halves in one batched call: v = v_u + w·(v_c − v_u); w = 1
skips the null half. stepsmith's :class:`~schedules.conditioning.ConditionalAdapter` computes the same.
"""

from __future__ import annotations

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from schedules.io import StepsmithError
from schedules.pipeline import UnconditionalFlowMatchPipeline, _retrieve_timesteps


class ClassConditionalFlowMatchPipeline(UnconditionalFlowMatchPipeline):
    """Class-conditional flow-matching ``UNet2DModel`` with classifier-free guidance."""

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    def _labels(self, class_labels) -> torch.Tensor:
        y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if y.numel() == 0 or int(y.min()) < 0 or int(y.max()) >= self.null_class:
            raise StepsmithError(f"class_labels must lie in 0..{self.null_class - 1} (label {self.null_class} is "
                                 f"the null label), got {y.tolist()}")
        return y

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
        if w == 1.0:
            return self.unet(x, t, class_labels=y).sample
        null = torch.full_like(y, self.null_class)
        v_c, v_u = self.unet(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([y, null])).sample.chunk(2)
        return v_u + w * (v_c - v_u)

    @torch.no_grad()
    def __call__(self, class_labels=(0,), guidance_scale: float = 1.0, num_inference_steps: int = 28,
                 timesteps: list[float] | None = None, sigmas: list[float] | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """One image per entry of ``class_labels`` at guidance ``guidance_scale`` (≥ 0; 1 = none)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise StepsmithError(f"output_type {output_type!r}: use pil, np, pt or latent")
        if not guidance_scale >= 0:
            raise StepsmithError(f"guidance_scale must be ≥ 0, got {guidance_scale}")
        device, dtype = self._execution_device, self.unet.dtype
        y = self._labels(class_labels).to(device)
        shape = self._sample_shape(len(y))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise StepsmithError(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
        latents = latents.to(device=device, dtype=dtype)
        steps, _ = _retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        for t in self.progress_bar(steps):
            t_b = t.to(device=device, dtype=torch.float32).expand(len(y))
            latents = self.scheduler.step(self._velocity(latents, t_b, y, float(guidance_scale)), t, latents,
                                          return_dict=False)[0]
        image = latents
        if output_type != "latent":
            image = (latents / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                image = image.cpu().permute(0, 2, 3, 1).float().numpy()
                image = self.numpy_to_pil(image) if output_type == "pil" else image
        return ImagePipelineOutput(images=image) if return_dict else (image,)
