"""Tiny random-weight diffusers pipelines built offline (SD1.5, SDXL, SD3, Flux, DiT), for tests.

Tokenizer vocabularies are written to a folder (``write_vocab``); every builder seeds torch so two
builds are identical, and every pipeline survives ``save_pretrained`` / ``from_pretrained`` offline.
Shared by the plug tests and the pipeline-adapter tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

# SD1.5 / SDXL noise schedule (scaled_linear betas)
SD_SCHED = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")


# ------------------------------------------------------------------ tiny components


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_vocab(d: Path) -> Path:
    """Tokenizer vocabularies (CLIP BPE with the merges for "cat", a T5 Unigram in ``d/t5``) written into ``d``."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in _bytes_to_unicode():
            vocab.setdefault(c + suffix, len(vocab))
    for merged in ("ca", "cat</w>"):
        vocab[merged] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    # T5's own layout (pad 0, eos 1, unk 2) as a tiny Unigram model with SentencePiece's "▁" word marker: the
    # tokenizers-backed T5TokenizerFast rebuilds exactly this model from a saved tokenizer.json, so the folder
    # written here (and every pipeline saved with it) reloads with from_pretrained. "a cat dog" → 3 4 5 </s>.
    T5TokenizerFast(vocab=T5_VOCAB, extra_ids=0, model_max_length=16).save_pretrained(d / "t5")
    return d


# (piece, log-probability) pairs of the tiny T5 Unigram vocabulary; anything else maps to <unk>
T5_VOCAB = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("▁cat", -1.0), ("▁dog", -1.0)]


def clip_tokenizer(d):
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), model_max_length=16)


def t5_tokenizer(d):
    """The tiny T5 tokenizer, loaded back from the folder :func:`write_vocab` saved it to."""
    return T5TokenizerFast.from_pretrained(Path(d) / "t5")


def clip_config(hidden=32, proj=32):
    return CLIPTextConfig(vocab_size=600, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=proj,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")


def tiny_t5(d_model=32):
    torch.manual_seed(3)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=d_model, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def tiny_vae(latent_channels=4, shift_factor=None):
    """A 2-level VAE (scale factor 2); SD3 / Flux decode ``latents / scaling_factor + shift_factor``, so their
    VAEs carry a shift (the real ones: 0.0609 / 0.1159)."""
    torch.manual_seed(4)
    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=2, shift_factor=shift_factor).eval()


def sd_pipeline(vocab_dir):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, attention_head_dim=2).eval()
    torch.manual_seed(1)
    te = CLIPTextModel(clip_config()).eval()
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=te, tokenizer=clip_tokenizer(vocab_dir), unet=unet,
                                   scheduler=PNDMScheduler(**SD_SCHED, skip_prk_steps=True), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(vocab_dir):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                norm_num_groups=2, attention_head_dim=2, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32).eval()
    torch.manual_seed(1)
    te = CLIPTextModel(clip_config()).eval()
    te2 = CLIPTextModelWithProjection(clip_config()).eval()
    tok = clip_tokenizer(vocab_dir)
    sched = EulerDiscreteScheduler(**SD_SCHED)
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)


def sd3_pipeline(vocab_dir):
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                               joint_attention_dim=32, pooled_projection_dim=64).eval()
    torch.manual_seed(1)
    te = CLIPTextModelWithProjection(clip_config()).eval()
    te2 = CLIPTextModelWithProjection(clip_config()).eval()
    tok = clip_tokenizer(vocab_dir)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(shift_factor=0.0609), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=tiny_t5(), tokenizer_3=t5_tokenizer(vocab_dir))


def flux_pipeline(vocab_dir):
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8]).eval()
    torch.manual_seed(1)
    te = CLIPTextModel(clip_config()).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=tiny_vae(latent_channels=1, shift_factor=0.1159), text_encoder=te,
                        tokenizer=clip_tokenizer(vocab_dir), text_encoder_2=tiny_t5(), tokenizer_2=t5_tokenizer(vocab_dir),
                        transformer=tr)


# DiT-style VP schedule (linear betas); clip_sample off so the DDIM step is the plain deterministic update
DIT_SCHED = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, steps_offset=0)


def dit_pipeline():
    """A tiny DiTPipeline: learned-sigma DiT (out_channels = 2·in_channels), 1000 classes + the null label 1000."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(5)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    return DiTPipeline(transformer=tr, vae=tiny_vae(), scheduler=DDIMScheduler(**DIT_SCHED))


def flux_guidance_pipeline(vocab_dir):
    """A guidance-distilled Flux (FLUX.1-dev style: ``guidance_embeds=True``), otherwise as :func:`flux_pipeline`."""
    pipe = flux_pipeline(vocab_dir)
    torch.manual_seed(5)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()
    return FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, transformer=tr)


def dit_final_latents(pipe, labels: list[int], guidance_scale: float, steps: int, seed: int = 7) -> torch.Tensor:
    """DiTPipeline's last scheduler state (before the VAE) for ``labels``: the pipeline has no latent
    output, so its scheduler's ``step`` is wrapped for the run (under CFG the state is the doubled batch)."""
    cls = type(pipe.scheduler)
    step, finals = cls.step, []

    def recording_step(self, *a, **k):
        out = step(self, *a, **k)
        finals.append(out.prev_sample)
        return out

    cls.step = recording_step
    try:
        pipe(labels, guidance_scale=guidance_scale, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(seed), output_type="pt")
    finally:
        cls.step = step
    return finals[-1]
