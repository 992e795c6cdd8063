"""Proof on the real diffusers pipeline classes: StableDiffusion, StableDiffusionXL,
StableDiffusion3 and Flux, built offline with tiny random weights (tokenizer vocabularies
are written to a temporary folder). For each, a plugged table must reach the denoiser
exactly — hooked timesteps equal the table's, one call per NFE (CFG doubles the batch,
not the calls) — and bad tables must fail before the first denoiser call.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HeunDiscreteScheduler,
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

from schedules.conventions import FlowConvention, VPConvention
from schedules.diffusers import model_timesteps, pipeline_kwargs, remove_table
from schedules.io import StepsmithError
from schedules.table import TimestepTable

torch.set_num_threads(1)

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


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in _bytes_to_unicode():
            vocab.setdefault(c + suffix, len(vocab))
    for merged in ("ca", "cat</w>"):
        vocab[merged] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5}
    t5 = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    t5.pre_tokenizer = pre_tokenizers.Whitespace()
    t5.save(str(d / "t5.json"))
    return d


def clip_tokenizer(d):
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), model_max_length=16)


def t5_tokenizer(d):
    return T5TokenizerFast(tokenizer_file=str(d / "t5.json"), extra_ids=0, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", model_max_length=16)


def clip_config(hidden=32, proj=32):
    return CLIPTextConfig(vocab_size=600, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=proj,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")


def tiny_t5(d_model=32):
    torch.manual_seed(3)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=d_model, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def tiny_vae(latent_channels=4):
    torch.manual_seed(4)
    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=2).eval()


@pytest.fixture(scope="module")
def sd_pipe(vocab_dir):
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


@pytest.fixture(scope="module")
def sdxl_pipe(vocab_dir):
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


@pytest.fixture(scope="module")
def sd3_pipe(vocab_dir):
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                               joint_attention_dim=32, pooled_projection_dim=64).eval()
    torch.manual_seed(1)
    te = CLIPTextModelWithProjection(clip_config()).eval()
    te2 = CLIPTextModelWithProjection(clip_config()).eval()
    tok = clip_tokenizer(vocab_dir)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=tiny_t5(), tokenizer_3=t5_tokenizer(vocab_dir))


@pytest.fixture(scope="module")
def flux_pipe(vocab_dir):
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8]).eval()
    torch.manual_seed(1)
    te = CLIPTextModel(clip_config()).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=tiny_vae(latent_channels=1), text_encoder=te,
                        tokenizer=clip_tokenizer(vocab_dir), text_encoder_2=tiny_t5(), tokenizer_2=t5_tokenizer(vocab_dir),
                        transformer=tr)


# ------------------------------------------------------------------ recording the denoiser


class Recorder:
    """Forward pre-hook: the timestep every denoiser call received, and its batch size."""

    def __init__(self, module, scale=1.0):
        self.values: list[float] = []
        self.batches: list[int] = []
        self.scale = scale
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = torch.as_tensor(t).reshape(-1).to(torch.float64)
        assert torch.all(t == t[0])
        self.values.append(float(t[0]) * self.scale)
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        self.batches.append(int(x.shape[0]))


def run(pipe, denoiser, kwargs, scale=1.0, **call):
    rec = Recorder(denoiser, scale)
    try:
        pipe("a cat", height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0), **call,
             **kwargs)
    finally:
        rec.handle.remove()
    return rec


def vp_table(ts, solver="euler", cfg=SD_SCHED, prediction="epsilon"):
    conv = VPConvention.from_scheduler_config(cfg)
    sig = conv.sigma_from_model_time(torch.tensor(ts, dtype=torch.float64)).tolist() + [0.0]
    return TimestepTable.from_sigmas(sig, convention=conv, prediction=prediction, solver=solver, method="test",
                                     model="tiny-sd")


def flow_table(sigmas=(1.0, 0.86, 0.62, 0.33, 0.1, 0.0), solver="euler"):
    return TimestepTable.from_sigmas(list(sigmas), convention=FlowConvention(1000.0), prediction="flow", solver=solver,
                                     method="test", model="tiny-flow")


def check(rec, table, sched, batch):
    assert len(rec.values) == table.nfe, f"{len(rec.values)} denoiser calls for a table of NFE {table.nfe}"
    assert rec.values == pytest.approx(model_timesteps(table, sched), abs=2e-3)
    assert set(rec.batches) == {batch}


# ------------------------------------------------------------------ SD 1.5


@pytest.mark.parametrize("solver,ts", [("euler", (999.0, 734.5, 402.0, 151.25, 21.0)), ("ddim", (999.0, 601.0, 201.0, 11.0)),
                                       ("dpmpp-2m", (981.0, 700.0, 400.0, 100.0)), ("heun", (961.0, 500.0, 50.0))])
def test_sd_pipeline_with_cfg(sd_pipe, solver, ts, caplog):
    table = vp_table(ts, solver)
    with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
        kw = pipeline_kwargs(table, sd_pipe)
    try:
        assert "PNDMScheduler" in caplog.text  # PNDM takes no custom schedule: swapped, and said so
        rec = run(sd_pipe, sd_pipe.unet, kw, guidance_scale=5.0, num_images_per_prompt=2)
        check(rec, table, sd_pipe.scheduler, batch=4)  # CFG doubles the batch (2 images × 2), not the calls
    finally:
        remove_table(sd_pipe)
    assert type(sd_pipe.scheduler).__name__ == "PNDMScheduler"


def test_sd_pipeline_keeps_a_capable_scheduler_and_uses_timesteps(sd_pipe):
    orig = sd_pipe.scheduler
    sd_pipe.scheduler = DPMSolverMultistepScheduler(**SD_SCHED, solver_order=1)
    try:
        table = vp_table((999.0, 500.0, 100.0), "ddim")
        kw = pipeline_kwargs(table, sd_pipe)
        assert kw == {"timesteps": [999, 500, 100]}
        check(run(sd_pipe, sd_pipe.unet, kw, guidance_scale=1.0), table, sd_pipe.scheduler, batch=1)
    finally:
        sd_pipe.scheduler = orig


# ------------------------------------------------------------------ SDXL


@pytest.mark.parametrize("solver,ts", [("euler", (999.0, 734.5, 402.0, 151.25, 21.0)), ("heun", (999.0, 500.0, 50.0))])
def test_sdxl_pipeline(sdxl_pipe, solver, ts):
    table = vp_table(ts, solver)
    kw = pipeline_kwargs(table, sdxl_pipe)
    try:
        if solver == "euler":
            assert set(kw) == {"sigmas"} and type(sdxl_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        check(run(sdxl_pipe, sdxl_pipe.unet, kw, guidance_scale=3.0), table, sdxl_pipe.scheduler, batch=2)
    finally:
        remove_table(sdxl_pipe)


def test_sdxl_with_ays_timesteps_from_diffusers(sdxl_pipe):
    from diffusers.schedulers.scheduling_utils import AysSchedules

    from schedules.interchange import table_from_timesteps

    table = table_from_timesteps(AysSchedules["StableDiffusionXLTimesteps"], scheduler=sdxl_pipe.scheduler,
                                 solver="dpmpp-2m", model="ays-sdxl")
    kw = pipeline_kwargs(table, sdxl_pipe)
    try:
        check(run(sdxl_pipe, sdxl_pipe.unet, kw, guidance_scale=1.0), table, sdxl_pipe.scheduler, batch=1)
        assert model_timesteps(table, sdxl_pipe.scheduler) == list(map(float, AysSchedules["StableDiffusionXLTimesteps"]))
    finally:
        remove_table(sdxl_pipe)


# ------------------------------------------------------------------ SD3 and Flux (flow matching)


def test_sd3_pipeline_shift_compensated(sd3_pipe):
    table = flow_table()
    kw = pipeline_kwargs(table, sd3_pipe)
    assert set(kw) == {"sigmas"} and sd3_pipe.scheduler.config.shift == 3.0
    check(run(sd3_pipe, sd3_pipe.transformer, kw, guidance_scale=4.0), table, sd3_pipe.scheduler, batch=2)


def test_flux_pipeline_dynamic_shift_disabled(flux_pipe, caplog):
    table = flow_table()
    with caplog.at_level(logging.WARNING, logger="stepsmith.diffusers"):
        kw = pipeline_kwargs(table, flux_pipe)
    try:
        assert "use_dynamic_shifting=False" in caplog.text
        # Flux passes timestep/1000 (= σ) to its transformer
        check(run(flux_pipe, flux_pipe.transformer, kw, scale=1000.0, guidance_scale=1.0, num_images_per_prompt=2),
              table, flux_pipe.scheduler, batch=2)
    finally:
        remove_table(flux_pipe)
    assert flux_pipe.scheduler.config.use_dynamic_shifting


# ------------------------------------------------------------------ bad input, before any denoiser call


@pytest.mark.parametrize("which,make,match", [
    ("sd", lambda: flow_table(), "flow model but"),
    ("sd", lambda: vp_table((999.0, 500.0), cfg=dict(SD_SCHED, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
     "another VP noise schedule"),
    ("sd", lambda: vp_table((999.0, 500.0), prediction="v"), "v-prediction"),
    ("sd3", lambda: vp_table((999.0, 500.0)), "vp model but"),
    ("flux", lambda: flow_table(solver="dpmpp-2m"), "no diffusers scheduler"),
])
def test_bad_tables_fail_before_the_first_call(request, which, make, match):
    pipe = request.getfixturevalue(f"{which}_pipe")
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    before = pipe.scheduler
    rec = Recorder(denoiser)
    try:
        with pytest.raises(StepsmithError, match=match):
            pipe("a cat", height=16, width=16, output_type="latent", **pipeline_kwargs(make(), pipe))
    finally:
        rec.handle.remove()
    assert rec.values == [] and pipe.scheduler is before


def test_unsupported_scheduler_is_refused_with_the_list(sd_pipe):
    orig = sd_pipe.scheduler
    sd_pipe.scheduler = DDIMScheduler(**SD_SCHED)
    try:
        with pytest.raises(StepsmithError, match="FlowMatchEulerDiscreteScheduler.*EulerDiscreteScheduler"):
            pipeline_kwargs(vp_table((999.0, 500.0)), sd_pipe, swap=False)
        with pytest.raises(StepsmithError, match="HeunDiscreteScheduler"):
            sd_pipe.scheduler = EulerDiscreteScheduler(**SD_SCHED)
            pipeline_kwargs(vp_table((999.0, 500.0), "heun"), sd_pipe, swap=False)
    finally:
        sd_pipe.scheduler = orig


def test_heun_scheduler_counts_2k_minus_1(sd_pipe):
    orig = sd_pipe.scheduler
    sd_pipe.scheduler = HeunDiscreteScheduler(**SD_SCHED)
    try:
        table = vp_table((999.0, 700.0, 300.0, 30.0), "heun")
        kw = pipeline_kwargs(table, sd_pipe)
        assert kw == {"timesteps": [999, 700, 300, 30]}
        rec = run(sd_pipe, sd_pipe.unet, kw, guidance_scale=1.0)
        assert len(rec.values) == 2 * table.steps - 1 == table.nfe
    finally:
        sd_pipe.scheduler = orig
