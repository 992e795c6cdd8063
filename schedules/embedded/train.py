"""Train the embedded default models (CPU, minutes, no download).

    python -m schedules.embedded.train toy2d-flow --steps 10000 --seed 0 --threads 1
    python -m schedules.embedded.train digits-flow --steps 1500 --warmup 200 --seed 0 --threads 1
    python -m schedules.embedded.train digits-ddpm --steps 4000 --warmup 200 --seed 0 --threads 1
    python -m schedules.embedded.train digits-features --steps 1500 --seed 0 --threads 1
    python -m schedules.embedded.train sharp-ddpm --steps 1400 --batch-size 32 --warmup 140 --seed 0 --threads 1
    python -m schedules.embedded.train sharp-features --steps 600 --seed 0 --threads 1
    python -m schedules.embedded.train digits-cond --steps 650 --batch-size 48 --warmup 65 --seed 0 --threads 1

The flow models take ``--coupling independent|ot`` (with ``--ot-batch N``): which noise each
training sample is paired with (:mod:`schedules.couplings`; ``ot`` is minibatch exact OT, computed
on the CPU per OT batch of N pairs, N independent of ``--batch-size``). The embedded models are
unconditional, so the condition-aware ``c2ot`` is refused.

The weights are written (atomically) to ``schedules/embedded/<name>/`` together with
``training.json``: the exact command, seed, steps, final loss and seconds. Training
checkpoints every ``--ckpt-every`` steps to ``--work``; a killed run started again
with the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from schedules.couplings import COUPLINGS, Coupling
from schedules.embedded import EMBEDDED_DIR
from schedules.embedded.nets import (
    DIGITS_NULL_CLASS,
    DigitsFeatures,
    Toy2DVelocity,
    digits_data,
    digits_unet_config,
    sharp_digits_data,
    toy2d_data,
)
from schedules.io import StepsmithError, atomic_torch_save, atomic_write_json, safe_torch_load, save_safetensors

DDPM_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
    prediction_type="epsilon", clip_sample=False,
)
FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)
FLOW_PIPELINE_CLASS = "UnconditionalFlowMatchPipeline"
COND_PIPELINE_CLASS = "ClassConditionalFlowMatchPipeline"
DDPM_MODELS = ("digits-ddpm", "sharp-ddpm")  # ε-prediction UNets with the linear-beta DDPM_SCHEDULER
CLASSIFIERS = ("digits-features", "sharp-features")  # FID feature networks (DigitsFeatures)
LABEL_DROPOUT = 0.1  # digits-cond: share of labels replaced by the null label, so one network gives D_u and D_c


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def _coupled(batch: torch.Tensor, gen: torch.Generator, coupling: Coupling | None,
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise for a pool of samples, the samples re-paired by ``coupling``, cut to ``batch_size``."""
    eps = torch.randn(batch.shape, generator=gen)
    if coupling is not None:
        batch = batch[coupling.couple(eps, batch)]
    return eps[:batch_size], batch[:batch_size]


def _loss_toy2d(model, batch: torch.Tensor, gen: torch.Generator, coupling: Coupling | None = None,
                batch_size: int | None = None) -> torch.Tensor:
    # diffusers FlowMatch convention: x_σ = (1-σ)·x0 + σ·ε, target ε - x0
    eps, batch = _coupled(batch, gen, coupling, batch_size or len(batch))
    sigma = torch.rand(batch.shape[0], generator=gen)
    x = (1 - sigma[:, None]) * batch + sigma[:, None] * eps
    return F.mse_loss(model(x, sigma), eps - batch)


def _loss_digits_flow(model, batch: torch.Tensor, gen: torch.Generator, coupling: Coupling | None = None,
                      batch_size: int | None = None) -> torch.Tensor:
    eps, batch = _coupled(batch, gen, coupling, batch_size or len(batch))
    sigma = torch.rand(batch.shape[0], generator=gen)
    s = sigma[:, None, None, None]
    x = (1 - s) * batch + s * eps
    # the UNet receives timestep = σ·1000, as SD3/Flux transformers do
    return F.mse_loss(model(x, sigma * 1000.0).sample, eps - batch)


def _loss_digits_cond(model, batch: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flow-matching loss with label dropout (classifier-free guidance, Ho & Salimans 2022)."""
    drop = torch.rand(labels.shape[0], generator=gen) < LABEL_DROPOUT
    labels = torch.where(drop, torch.full_like(labels, DIGITS_NULL_CLASS), labels)
    eps = torch.randn(batch.shape, generator=gen)
    sigma = torch.rand(batch.shape[0], generator=gen)
    s = sigma[:, None, None, None]
    x = (1 - s) * batch + s * eps
    return F.mse_loss(model(x, sigma * 1000.0, class_labels=labels).sample, eps - batch)


def _loss_digits_ddpm(model, batch: torch.Tensor, gen: torch.Generator, alphas_cumprod) -> torch.Tensor:
    eps = torch.randn(batch.shape, generator=gen)
    t = torch.randint(0, len(alphas_cumprod), (batch.shape[0],), generator=gen)
    a = alphas_cumprod[t][:, None, None, None]
    x = a.sqrt() * batch + (1 - a).sqrt() * eps
    return F.mse_loss(model(x, t).sample, eps)


def _build(name: str):
    if name == "toy2d-flow":
        return Toy2DVelocity()
    if name in CLASSIFIERS:
        return DigitsFeatures()
    from diffusers import UNet2DModel

    if name == "digits-cond":
        return UNet2DModel(**digits_unet_config(), num_class_embeds=DIGITS_NULL_CLASS + 1)
    return UNet2DModel(**digits_unet_config())


@dataclass
class _Run:
    """What a training run updates, and what a checkpoint saves."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator


def _data(name: str, seed: int):
    """Training data and labels, plus the held-out 20% (features network only) that reports accuracy."""
    if name == "toy2d-flow":
        return toy2d_data(200_000, seed=seed), None, None
    data, labels = sharp_digits_data() if name.startswith("sharp-") else digits_data()
    if name not in CLASSIFIERS:
        return data, labels, None
    # hold out 20% to report accuracy; the shipped network is trained on the other 80%
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = len(data) // 5
    heldout = data[perm[:n_test]], labels[perm[:n_test]]
    return data[perm[n_test:]], labels[perm[n_test:]], heldout


def _resume(run: _Run, ckpt: Path, name: str, config: list, warmup: int) -> int:
    """Load ``ckpt`` into ``run`` when it exists; returns the step to continue from (0 for a fresh run)."""
    if not ckpt.exists():
        return 0
    state = safe_torch_load(ckpt)
    steps, *cfg = config
    # the planned step count may change on resume (the LR is constant after warm-up); nothing else may
    old_steps, *old_cfg = state["config"]
    old_warmup = state.get("warmup", min(200, old_steps // 10))
    if old_cfg != cfg or old_warmup != warmup or state["step"] > steps:
        raise SystemExit(f"{ckpt} was written with other settings {state['config']}; delete it to restart")
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.opt.load_state_dict(state["opt"])
    run.sched.load_state_dict(state["sched"])
    run.gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {name} from step {state['step']}", file=sys.stderr)
    return state["step"]


def _checkpoint(run: _Run, ckpt: Path, config: list, warmup: int, step: int) -> None:
    atomic_torch_save(ckpt, dict(
        config=config, warmup=warmup, step=step, model=run.model.state_dict(),
        ema=run.ema.state_dict(), opt=run.opt.state_dict(), sched=run.sched.state_dict(),
        gen=run.gen.get_state(), torch_rng=torch.get_rng_state(),
    ))


def _loss(name: str, model, data, labels, idx, gen: torch.Generator, alphas_cumprod,
          coupling: Coupling | None = None, batch_size: int | None = None) -> torch.Tensor:
    batch = data[idx]
    if name == "toy2d-flow":
        return _loss_toy2d(model, batch, gen, coupling, batch_size)
    if name == "digits-flow":
        return _loss_digits_flow(model, batch, gen, coupling, batch_size)
    if name in DDPM_MODELS:
        return _loss_digits_ddpm(model, batch, gen, alphas_cumprod)
    if name == "digits-cond":
        return _loss_digits_cond(model, batch, labels[idx], gen)
    # light augmentation: random shifts by up to one pixel
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    batch = torch.roll(batch, shifts=(dx, dy), dims=(2, 3))
    return F.cross_entropy(model.classify(batch), labels[idx])


def _ddpm_alphas_cumprod(name: str):
    if name not in DDPM_MODELS:
        return None
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DDPM_SCHEDULER).alphas_cumprod.float()


def training_coupling(name: str, kind: str, ot_batch: int | None, n_data: int) -> Coupling | None:
    """The coupling of a flow model's training pairs (``None``: independent, the default stream)."""
    coupling = Coupling(kind, ot_batch)
    if kind == "independent":
        return None
    if name not in ("toy2d-flow", "digits-flow"):
        raise StepsmithError(f"`coupling` {kind!r} applies to the flow models, not {name}", param="coupling")
    coupling.check(n_data, conditional=False)  # the embedded flow models are unconditional
    return coupling


def train(name: str, steps: int, seed: int, batch_size: int, lr: float, work: Path,
          ckpt_every: int, ema_decay: float = 0.998, warmup: int | None = None,
          coupling: str = "independent", ot_batch: int | None = None) -> dict:
    """Train ``name`` for ``steps`` (resuming from ``work``); returns the EMA model, ``info`` and the checkpoint path."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _build(name)
    ema = _build(name)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if warmup is None:
        warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup)))
    run = _Run(model, ema, opt, sched, gen)
    data, labels, heldout = _data(name, seed)
    coupler = training_coupling(name, coupling, ot_batch, len(data))
    pool = coupler.pool_size(batch_size) if coupler is not None else batch_size
    alphas_cumprod = _ddpm_alphas_cumprod(name)
    config = [steps, seed, batch_size, lr] + ([coupling, ot_batch] if coupler is not None else [])
    ckpt = work / f"{name}.ckpt"
    start = _resume(run, ckpt, name, config, warmup)

    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(start, steps), desc=f"train {name}", initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, len(data), (pool,), generator=gen)
        loss = _loss(name, model, data, labels, idx, gen, alphas_cumprod, coupler, batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, model, ema_decay if step > warmup else 0.0)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % ckpt_every == 0 and step + 1 < steps:
            _checkpoint(run, ckpt, config, warmup, step + 1)
    info = dict(
        model=name, steps=steps, seed=seed, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
        **({"coupling": coupling, "ot_batch": ot_batch} if coupler is not None else {}),
        final_loss=sum(losses[-200:]) / max(1, len(losses[-200:])),
        seconds_this_run=round(time.perf_counter() - t0, 1),
        torch=torch.__version__, threads=torch.get_num_threads(),
    )
    if heldout is not None:
        ema.eval()
        with torch.no_grad():
            info["heldout_accuracy"] = (ema.classify(heldout[0]).argmax(1) == heldout[1]).float().mean().item()
    return dict(model=ema.eval(), info=info, ckpt=ckpt)


def export(name: str, model: torch.nn.Module, info: dict, out: Path) -> None:
    """Write the embedded model folder atomically (build beside it, then swap)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if name in ("toy2d-flow", *CLASSIFIERS):
        save_safetensors(tmp / "model.safetensors", model.state_dict())
    else:
        import diffusers

        model.save_pretrained(tmp / "unet", safe_serialization=True)
        if name in DDPM_MODELS:
            sched_cls, sched_cfg, pipe_cls = "DDPMScheduler", DDPM_SCHEDULER, "DDPMPipeline"
        else:
            sched_cls, sched_cfg = "FlowMatchEulerDiscreteScheduler", FLOW_SCHEDULER
            pipe_cls = COND_PIPELINE_CLASS if name == "digits-cond" else FLOW_PIPELINE_CLASS
        getattr(diffusers, sched_cls)(**sched_cfg).save_config(tmp / "scheduler")
        index = {"_class_name": pipe_cls, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", sched_cls], "unet": ["diffusers", "UNet2DModel"]}
        atomic_write_json(tmp / "model_index.json", index)
    atomic_write_json(tmp / "training.json", info)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["toy2d-flow", "digits-flow", "digits-ddpm", "digits-features", "digits-cond",
                                     "sharp-ddpm", "sharp-features"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="LR warm-up steps (default min(200, steps/10))")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("runs/embedded-train"))
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--out", type=Path, default=None, help="default: schedules/embedded/<model>")
    p.add_argument("--coupling", choices=COUPLINGS, default="independent",
                   help="noise–sample coupling of the flow models' training pairs (default independent)")
    p.add_argument("--ot-batch", type=int, default=None,
                   help="pairs per OT problem of --coupling ot (default: the batch size)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    defaults = {
        "toy2d-flow": (10_000, 1024, 1e-3),
        "digits-flow": (1500, 64, 1e-3),
        "digits-ddpm": (4000, 64, 1e-3),  # ε-prediction needs longer than flow: 1500 steps left ~5% noise blobs
        "digits-features": (1500, 128, 1e-3),
        "sharp-ddpm": (1400, 32, 1e-3),  # fits a 15-minute one-thread CPU budget on a shared machine
        "sharp-features": (600, 128, 1e-3),
        "digits-cond": (650, 48, 1e-3),  # label dropout 0.1 (null label 10); 650 steps fit a 12-minute CPU budget
    }[a.model]
    steps = a.steps or defaults[0]
    bs = a.batch_size or defaults[1]
    lr = a.lr or defaults[2]
    a.work.mkdir(parents=True, exist_ok=True)
    warmup = a.warmup if a.warmup is not None else min(200, steps // 10)
    try:
        res = train(a.model, steps, a.seed, bs, lr, a.work, a.ckpt_every, warmup=warmup, coupling=a.coupling,
                    ot_batch=a.ot_batch)
    except StepsmithError as exc:
        p.error(str(exc).replace("`coupling`", "--coupling").replace("`ot_batch`", "--ot-batch"))
    info = res["info"]
    coupling_flags = [] if a.coupling == "independent" else [f"--coupling {a.coupling}"] + (
        [f"--ot-batch {a.ot_batch}"] if a.ot_batch is not None else [])
    info["command"] = "python -m schedules.embedded.train " + " ".join(
        [a.model, f"--steps {steps}", f"--seed {a.seed}", f"--batch-size {bs}", f"--lr {lr}", f"--warmup {warmup}",
         f"--threads {a.threads}", *coupling_flags])
    out = a.out or EMBEDDED_DIR / a.model
    export(a.model, res["model"], info, out)
    res["ckpt"].unlink(missing_ok=True)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
