"""SD3 and Flux pipeline adapters, proven exact against the real diffusers pipelines (tiny random weights).

For each: the pipeline run with a plugged table (``pipe(..., latents=noise, output_type="latent",
**pipeline_kwargs(table, pipe))``) and stepsmith's sampler on the adapter from the same noise must
end at the same latents (float32, atol = rtol = 1e-5; measured differences are ≈1e-6). Also: one
adapter call per NFE (CFG doubles the batch, distilled guidance does not), micro-batches under
``bind`` give the same samples, a save_pretrained / from_pretrained round trip gives the same
adapter, and bad input fails with a clear StepsmithError.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from schedules.conditioning import Conditioning, bind, conditioning_mismatch
from schedules.diffusers import pipeline_kwargs, remove_table
from schedules.io import StepsmithError
from schedules.pipeline_adapters import adapter_from_pipeline
from schedules.solvers import sample
from tests.test_diffusers_pipelines import Recorder, flow_table

torch.set_num_threads(1)

TOL = dict(atol=1e-5, rtol=1e-5)
PROMPTS = ("a cat", "a dog")


def pipeline_latents(pipe, table, noise, **call):
    """The pipeline's own final latents for ``table`` from ``noise`` (scheduler restored afterwards)."""
    try:
        with torch.no_grad():
            return pipe(list(PROMPTS), height=16, width=16, latents=noise.clone(), output_type="latent",
                        **call, **pipeline_kwargs(table, pipe)).images
    finally:
        remove_table(pipe)


def stepsmith_latents(adapter, table, noise):
    rec = Recorder(adapter.module)
    try:
        with torch.no_grad():
            out = sample(adapter, noise, table.sigmas, table.solver)
    finally:
        rec.handle.remove()
    return out, rec


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("solver,sigmas", [("euler", (1.0, 0.86, 0.62, 0.33, 0.1, 0.0)), ("heun", (1.0, 0.7, 0.3, 0.0))])
def test_sd3_with_cfg_matches_the_pipeline(sd3_pipe, solver, sigmas):
    table = flow_table(sigmas, solver)  # heun: the pipeline gets FlowMatchHeunDiscreteScheduler swapped in
    adapter = adapter_from_pipeline(sd3_pipe, Conditioning(prompts=PROMPTS, guidance=5.0, height=16, width=16))
    assert adapter.sample_shape == (4, 8, 8) and adapter.conditioning.guided
    assert adapter.conditioning.negative == ""  # the pipeline's default negative prompt
    noise = adapter.noise(2, 0)
    want = pipeline_latents(sd3_pipe, table, noise, guidance_scale=5.0)
    got, rec = stepsmith_latents(adapter, table, noise)
    torch.testing.assert_close(got, want, **TOL)
    assert adapter.calls == table.nfe == len(rec.values)  # one guided call per NFE ...
    assert set(rec.batches) == {4}  # ... on the doubled batch
    if solver == "euler":
        assert rec.values == pytest.approx([s * 1000 for s in table.sigmas[:-1]], abs=1e-3)  # t = σ·1000
    # guidance matters: the unguided adapter ends elsewhere
    plain = adapter_from_pipeline(sd3_pipe, Conditioning(prompts=PROMPTS, height=16, width=16))
    assert not torch.allclose(stepsmith_latents(plain, table, noise)[0], want, atol=1e-3)


def test_flux_true_cfg_matches_the_pipeline(flux_pipe):
    table = flow_table()
    cond = Conditioning(prompts=PROMPTS, negative="dog", guidance=4.0, height=16, width=16)
    adapter = adapter_from_pipeline(flux_pipe, cond)
    assert adapter.sample_shape == (16, 4)  # packed: (16/2/2)² tokens × 4·C
    noise = adapter.noise(2, 0)
    want = pipeline_latents(flux_pipe, table, noise, true_cfg_scale=4.0, negative_prompt=["dog", "dog"])
    got, rec = stepsmith_latents(adapter, table, noise)
    torch.testing.assert_close(got, want, **TOL)
    assert adapter.calls == table.nfe and set(rec.batches) == {4}
    assert rec.values == pytest.approx(table.sigmas[:-1], abs=1e-6)  # the transformer sees σ


def test_flux_distilled_guidance_matches_the_pipeline(flux_dev_pipe):
    table = flow_table((1.0, 0.75, 0.45, 0.2, 0.0))
    adapter = adapter_from_pipeline(flux_dev_pipe, Conditioning(prompts=PROMPTS, guidance=3.5, height=16, width=16))
    cond = adapter.conditioning
    assert not cond.guided and cond.guidance == 1.0 and cond.extra["distilled_guidance"] == 3.5
    noise = adapter.noise(2, 1)
    want = pipeline_latents(flux_dev_pipe, table, noise, guidance_scale=3.5)
    got, rec = stepsmith_latents(adapter, table, noise)
    torch.testing.assert_close(got, want, **TOL)
    assert adapter.calls == table.nfe and set(rec.batches) == {2}  # embedded guidance: the batch is not doubled
    other = adapter_from_pipeline(flux_dev_pipe, Conditioning(prompts=PROMPTS, guidance=2.0, height=16, width=16))
    assert not torch.allclose(stepsmith_latents(other, table, noise)[0], want, atol=1e-3)
    # a table records the embedded guidance and the resolution's μ, and another guidance is told apart
    block = cond.describe()
    assert block["distilled_guidance"] == 3.5 and block["mu"] == pytest.approx(calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert conditioning_mismatch(block, other.conditioning) is not None
    assert conditioning_mismatch(block, cond) is None


def test_flux_distilled_with_true_cfg_on_top(flux_dev_pipe):
    table = flow_table((1.0, 0.6, 0.25, 0.0))
    cond = Conditioning(prompts=PROMPTS, negative="dog", guidance=3.5, height=16, width=16)
    adapter = adapter_from_pipeline(flux_dev_pipe, cond, true_cfg_scale=2.0)
    assert adapter.conditioning.guidance == 2.0 and adapter.conditioning.extra["distilled_guidance"] == 3.5
    noise = adapter.noise(2, 2)
    want = pipeline_latents(flux_dev_pipe, table, noise, guidance_scale=3.5, true_cfg_scale=2.0,
                            negative_prompt=["dog", "dog"])
    torch.testing.assert_close(stepsmith_latents(adapter, table, noise)[0], want, **TOL)


# ------------------------------------------------------------------ micro-batches, round trip, defaults


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_micro_batches_give_the_same_samples(request, which):
    pipe = request.getfixturevalue(f"{which}_pipe")
    cond = Conditioning(prompts=PROMPTS, negative="dog", guidance=3.0, height=16, width=16)
    adapter = adapter_from_pipeline(pipe, cond)
    table = flow_table((1.0, 0.5, 0.0))
    noise = adapter.noise(3, 4)  # sample 2 gets prompt 0 again (i mod P)
    with torch.no_grad():
        whole = sample(adapter, noise, table.sigmas, "euler")
        parts = []
        for sl in (slice(0, 2), slice(2, 3)):
            with bind(sl):
                parts.append(sample(adapter, noise[sl], table.sigmas, "euler"))
        with bind([1]):
            wrong = sample(adapter, noise[2:3], table.sigmas, "euler")  # sample 2's noise under prompt 1
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(wrong, whole[2:], atol=1e-3)


@pytest.mark.parametrize("which,cls", [("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)])
def test_save_pretrained_round_trip(request, tmp_path, which, cls):
    pipe = request.getfixturevalue(f"{which}_pipe")
    cond = Conditioning(prompts=PROMPTS, negative="dog", guidance=3.0, height=16, width=16)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    # every weight, config and tokenizer (the T5 one included) is reloaded from tmp_path
    again = cls.from_pretrained(tmp_path, use_safetensors=True)
    assert again.transformer is not pipe.transformer
    t5 = "tokenizer_3" if which == "sd3" else "tokenizer_2"
    assert getattr(again, t5)(["a cat", "dog"]).input_ids == getattr(pipe, t5)(["a cat", "dog"]).input_ids == [[3, 4, 1], [5, 1]]
    a, b = adapter_from_pipeline(pipe, cond), adapter_from_pipeline(again, cond)
    assert a.describe() == b.describe()
    x, s = a.noise(2, 5), torch.full((2,), 0.6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(b.denoise(x, s), a.denoise(x, s), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_decoded_images_are_the_pipelines(request, which):
    """stepsmith's decoding (Flux: packed latents unpacked first) gives the pipeline's own output_type="pt" images."""
    from schedules.cli_sample import decode_latents

    pipe = request.getfixturevalue(f"{which}_pipe")
    table = flow_table((1.0, 0.5, 0.0))
    adapter = adapter_from_pipeline(pipe, Conditioning(prompts=PROMPTS, height=16, width=16))
    noise = adapter.noise(2, 4)
    try:
        with torch.no_grad():
            images = pipe(list(PROMPTS), height=16, width=16, latents=noise.clone(), output_type="pt",
                          guidance_scale=1.0, **pipeline_kwargs(table, pipe)).images  # unguided, as the adapter
    finally:
        remove_table(pipe)
    with torch.no_grad():
        decoded = decode_latents(adapter, sample(adapter, noise, table.sigmas, table.solver))
    assert decoded.shape == images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, images, atol=1e-4, rtol=0)


def test_default_sizes_are_the_pipelines(sd3_pipe, flux_pipe):
    sd3 = adapter_from_pipeline(sd3_pipe, Conditioning(prompts=PROMPTS))
    assert sd3.sample_shape == (4, 8, 8) and (sd3.conditioning.height, sd3.conditioning.width) == (16, 16)
    flux = adapter_from_pipeline(flux_pipe, Conditioning(prompts=PROMPTS))
    # FluxPipeline's default: 128 · vae_scale_factor (2 here) = 256 px → 128² latents → 64² = 4096 packed tokens
    assert flux.sample_shape == (4096, 4) and flux.conditioning.height == 256
    assert flux.conditioning.extra["mu"] == pytest.approx(1.15)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("which,cond,options,match", [
    ("sd3", None, {}, "--prompts"),
    ("flux", None, {}, "--prompts"),
    ("sd3", Conditioning(labels=(1, 2)), {}, "not class labels"),
    ("flux", Conditioning(labels=(1,)), {}, "not class labels"),
    ("sd3", Conditioning(prompts=PROMPTS, height=17, width=16), {}, "multiple of 2"),
    ("flux", Conditioning(prompts=PROMPTS, height=16, width=18), {}, "multiple of 4"),
    ("flux", Conditioning(prompts=PROMPTS, guidance=4.0), {}, "negative prompt"),
    ("flux", Conditioning(prompts=PROMPTS, guidance=4.0, negative="dog"), {"true_cfg_scale": 4.0},
     "as `guidance`, not `true_cfg_scale`"),
    ("flux_dev", Conditioning(prompts=PROMPTS, guidance=3.5), {"true_cfg_scale": 2.0}, "negative prompt"),
    ("sd3", Conditioning(prompts=PROMPTS), {"null_class": 3}, "takes no `null_class`"),
    ("flux", Conditioning(prompts=PROMPTS), {"max_sequence_length": 0}, "max_sequence_length"),
])
def test_bad_input_is_refused(request, which, cond, options, match):
    pipe = request.getfixturevalue(f"{which}_pipe")
    with pytest.raises(StepsmithError, match=match):
        adapter_from_pipeline(pipe, cond, **options)
