import os

import pytest
import torch

# The suite runs on 2 cores beside other work: one thread per test process.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def toy2d():
    from schedules import load_model

    return load_model("builtin:toy2d-flow")


# ------------------------------------------------------------------ tiny diffusers pipelines (tests/tiny_pipelines.py)
# Module-scoped: every test module gets its own instances (tests install tables on their schedulers).


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    from tests.tiny_pipelines import write_vocab

    return write_vocab(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def sd_pipe(vocab_dir):
    from tests.tiny_pipelines import sd_pipeline

    return _quiet(sd_pipeline(vocab_dir))


@pytest.fixture(scope="module")
def sdxl_pipe(vocab_dir):
    from tests.tiny_pipelines import sdxl_pipeline

    return _quiet(sdxl_pipeline(vocab_dir))


@pytest.fixture(scope="module")
def sd3_pipe(vocab_dir):
    from tests.tiny_pipelines import sd3_pipeline

    return _quiet(sd3_pipeline(vocab_dir))


@pytest.fixture(scope="module")
def flux_pipe(vocab_dir):
    from tests.tiny_pipelines import flux_pipeline

    return _quiet(flux_pipeline(vocab_dir))


@pytest.fixture(scope="module")
def flux_dev_pipe(vocab_dir):
    from tests.tiny_pipelines import flux_guidance_pipeline

    return _quiet(flux_guidance_pipeline(vocab_dir))


@pytest.fixture(scope="module")
def dit_pipe():
    from tests.tiny_pipelines import dit_pipeline

    return _quiet(dit_pipeline())


@pytest.fixture(scope="module")
def sd_folder(sd_pipe, tmp_path_factory):
    """The tiny SD pipeline saved with safetensors (a `--model DIR` folder)."""
    return _saved(sd_pipe, tmp_path_factory, "tiny-sd")


def _saved(pipe, tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("pipes") / name
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(sdxl_pipe, tmp_path_factory):
    """The tiny SDXL pipeline saved with safetensors (a `--model DIR` folder)."""
    return _saved(sdxl_pipe, tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="module")
def sd3_folder(sd3_pipe, tmp_path_factory):
    """The tiny SD3 pipeline (two CLIP encoders and a T5) saved with safetensors."""
    return _saved(sd3_pipe, tmp_path_factory, "tiny-sd3")


@pytest.fixture(scope="module")
def flux_folder(flux_pipe, tmp_path_factory):
    """The tiny Flux (schnell-style, no guidance embedding) pipeline saved with safetensors."""
    return _saved(flux_pipe, tmp_path_factory, "tiny-flux")


@pytest.fixture(scope="module")
def dit_folder(dit_pipe, tmp_path_factory):
    """The tiny class-conditional DiT pipeline saved with safetensors."""
    return _saved(dit_pipe, tmp_path_factory, "tiny-dit")


@pytest.fixture
def vp_gaussian_problem():
    """``make(nodes)`` → (adapter, grid, noise, target): a VP Gaussian model whose exact ODE solution of 8
    noises (seed 3) is the refinement target, on a grid of ``nodes`` intervals."""
    from schedules.search.common import make_grid
    from schedules.search.toys import gaussian_adapter

    def make(nodes: int):
        ad = gaussian_adapter("vp", 0.5, dim=4)
        noise = ad.noise(8, 3)
        return ad, make_grid(ad.convention, nodes), noise, ad.module.den.exact_solution(noise, ad.convention.sigma_max)

    return make
