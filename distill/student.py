"""The student of a distillation run: a copy of the teacher's network, optionally with LoRA,
its optimizer and the EMA of its trainable weights.

EMA: diffusers' ``EMAModel`` with its warm-up (``use_ema_warmup=True``, ``inv_gamma=1``,
``power=2/3``): at optimization step k = 1, 2, ... the decay is min(``ema_decay``, 1 - k^-2/3)
(0 at the first step), so short runs are not dominated by the initial weights. It
averages the trainable parameters only (the LoRA factors when LoRA is on); the exported
model holds the EMA weights.

LoRA: a diffusers network with diffusers' peft integration (``PeftAdapterMixin``: the
UNet2DConditionModel of SD/SDXL, the SD3 and Flux transformers) gets its adapter *in place*
(``module.add_adapter``), so its LoRA state dict (:func:`lora_state_dict`) has diffusers' own key
names and the pipeline's ``save_lora_weights`` / ``load_lora_weights`` round-trip it; any other
network is wrapped by ``peft.get_peft_model``. Either way the export also folds the factors in.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from distill.config import DistillConfig
from schedules.adapters import ModelAdapter
from schedules.io import StepsmithError

EMA_POWER = 2 / 3


def lora_targets(module: torch.nn.Module) -> list[str]:
    """Names of the Linear and Conv2d layers (LoRA goes on all of them)."""
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n]


def add_lora(module: torch.nn.Module, rank: int, alpha: float | None) -> torch.nn.Module:
    """``module`` wrapped by peft with rank-``rank`` LoRA on every Linear/Conv2d (the base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise StepsmithError("`lora_rank` needs peft: pip install 'stepsmith[lora]' (or pip install peft)",
                             param="lora_rank") from None
    targets = lora_targets(module)
    if not targets:
        raise StepsmithError("`lora_rank`: the model has no Linear/Conv2d layer to adapt; use full fine-tuning",
                             param="lora_rank")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    if has_diffusers_lora(module):
        module.add_adapter(cfg)  # in place: the base weights are frozen, the factors keep diffusers' names
        return module
    return get_peft_model(module, cfg)


def has_diffusers_lora(module: torch.nn.Module) -> bool:
    """Whether ``module`` takes LoRA through diffusers' own peft integration (``add_adapter`` / ``fuse_lora``)."""
    return all(callable(getattr(module, m, None)) for m in ("add_adapter", "fuse_lora", "unload_lora"))


def _adapted_in_place(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "_hf_peft_config_loaded", False))


@dataclass
class LoraWeights:
    """The LoRA factors of a network adapted in place, keyed as diffusers' ``save_lora_weights`` takes them
    (e.g. ``down_blocks.0.attentions.0....to_q.lora_A.weight``), and the ``LoraConfig`` as a dict (rank,
    alpha, targets: the adapter metadata ``load_lora_weights`` rebuilds the same scaling from)."""

    layers: dict[str, torch.Tensor]
    config: dict[str, Any]


def lora_state_dict(module: torch.nn.Module) -> LoraWeights | None:
    """The LoRA factors (CPU copies) and config of a diffusers network adapted in place; None otherwise."""
    if not _adapted_in_place(module):
        return None
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(module).items()}
    cfg = module.peft_config["default"].to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    return LoraWeights(layers, cfg)


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module with the LoRA factors folded into its weights (``module`` itself without LoRA)."""
    if hasattr(module, "merge_and_unload"):
        return module.merge_and_unload()
    if _adapted_in_place(module):
        module.fuse_lora()
        module.unload_lora()  # the LoRA layers replaced by their (now fused) base layers
    return module


def make_ema(params: list[torch.nn.Parameter], decay: float):
    """diffusers' ``EMAModel`` over ``params`` with warm-up: decay_k = min(decay, 1 - k^-2/3), 0 at step 1."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, min_decay=0.0, update_after_step=0, use_ema_warmup=True, inv_gamma=1.0,
                    power=EMA_POWER)


@dataclass
class Student:
    """The trainable copy of the teacher and what trains it."""

    adapter: ModelAdapter                 # the teacher's adapter around the prepared module
    model: torch.nn.Module                # the module as ``accelerator.prepare`` returned it
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]      # the trainable parameters (the LoRA factors with LoRA)
    ema: Any | None                       # ``EMAModel`` over ``params``; None when ``ema_decay`` is 0
    n_parameters: int                     # parameters of the teacher's network
    n_trainable: int

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.step(self.params)

    def apply_ema(self) -> None:
        """Replace the trained weights by their EMA (the weights the run exports)."""
        if self.ema is not None:
            self.ema.copy_to(self.params)

    def lora_layers(self, accelerator) -> LoraWeights | None:
        """The LoRA factors in diffusers' naming (after :meth:`apply_ema`, before :meth:`final_module`
        folds them in); None without LoRA or for a network outside diffusers' peft integration."""
        return lora_state_dict(accelerator.unwrap_model(self.model))

    def final_module(self, accelerator) -> torch.nn.Module:
        """The distilled network (after :meth:`apply_ema`): LoRA merged, frozen, in eval mode, on CPU."""
        final = merge_lora(accelerator.unwrap_model(self.model)).eval()
        final.requires_grad_(False)
        return final.to("cpu")


def build_student(adapter: ModelAdapter, config: DistillConfig, accelerator) -> Student:
    """Copy the teacher's network (float32; LoRA when ``lora_rank`` > 0), with AdamW and EMA, prepared
    by ``accelerator``. The LR is set by hand each step (a pure function of the step, see
    :func:`distill.trainer.learning_rate`): nothing to checkpoint, no scheduler for accelerate to step
    once per process."""
    torch.manual_seed(config.seed)
    module = copy.deepcopy(adapter.module).float()
    n_total = sum(p.numel() for p in module.parameters())
    if config.lora_rank > 0:
        module = add_lora(module, config.lora_rank, config.lora_alpha)
    else:
        module.requires_grad_(True)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, opt = accelerator.prepare(module, opt)
    ema = make_ema(params, config.ema_decay) if config.ema_decay > 0 else None
    return Student(adapter=dataclasses.replace(adapter, module=model, calls=0), model=model, optimizer=opt,
                   params=params, ema=ema, n_parameters=n_total, n_trainable=sum(p.numel() for p in params))
