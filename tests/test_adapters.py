import textwrap

import pytest
import torch

from schedules import FlowConvention, load_model, sample
from schedules.adapters import ModelAdapter
from schedules.io import StepsmithError, save_safetensors

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ddpm")
    sched = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = DDPMPipeline(UNet2DModel(**TINY_UNET), sched)
    pipe.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("flow")
    UNet2DModel(**TINY_UNET).save_pretrained(d / "unet")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(d / "scheduler")
    return d


def write_model_file(tmp_path, body):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent(body))
    return f


MODEL_SRC = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
        def forward(self, x, t):
            return self.lin(torch.cat([x, t[:, None]], 1))

    net = Net()
    def make():
        return Net()
    def not_a_module():
        return 3
    class Broken(nn.Module):
        def forward(self, x, t):
            return x * float("nan")
"""


def test_builtin_toy2d(toy2d):
    assert toy2d.convention.name == "flow" and toy2d.prediction == "flow" and toy2d.sample_shape == (2,)
    x = toy2d.noise(8, seed=0)
    assert x.shape == (8, 2)
    out = sample(toy2d, x, [1.0, 0.5, 0.0])
    assert out.shape == (8, 2) and torch.isfinite(out).all()
    assert toy2d.calls >= 2


def test_diffusers_pipeline_folder_reads_config(ddpm_folder):
    m = load_model(str(ddpm_folder))
    assert m.convention.name == "vp" and m.prediction == "v" and m.sample_shape == (1, 8, 8)
    # ᾱ come from the scheduler config (scaled_linear), not a guessed default
    assert m.convention.sigma_min == pytest.approx(0.0292, abs=1e-4)
    with pytest.raises(StepsmithError, match="says prediction 'v'"):
        load_model(str(ddpm_folder), prediction="epsilon")


def test_diffusers_model_folder_flow(flow_folder):
    m = load_model(str(flow_folder))
    assert isinstance(m.convention, FlowConvention) and m.convention.time_scale == 1000.0
    assert m.scheduler_config["shift"] == 3.0
    m2 = load_model(str(flow_folder / "unet"))  # finds ../scheduler beside the model folder
    assert m2.convention.name == "flow"


def test_model_folder_without_scheduler(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "unet_only")
    with pytest.raises(StepsmithError, match="--scheduler-config"):
        load_model(str(tmp_path / "unet_only"))


def test_corrupt_diffusers_weights(tmp_path, flow_folder):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(flow_folder, d)
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(StepsmithError, match="cannot load"):
        load_model(str(d))


@pytest.mark.parametrize("attr", ["net", "make"])
def test_callable_model_flow(tmp_path, attr):
    f = write_model_file(tmp_path, MODEL_SRC)
    m = load_model(f"{f}:{attr}", prediction="flow", shape="2")
    assert m.convention.time_scale == 1.0 and m.sample_shape == (2,)
    seen = []
    m.module.register_forward_pre_hook(lambda _mod, args: seen.append(args[1].clone()))
    sample(m, m.noise(4, 0), [1.0, 0.25, 0.0])
    assert [float(t[0]) for t in seen] == pytest.approx([1.0, 0.25])  # flow callables get t = σ


def test_callable_model_vp_gets_discrete_timesteps(tmp_path):
    f = write_model_file(tmp_path, MODEL_SRC)
    m = load_model(f"{f}:net", prediction="epsilon", shape="2")
    seen = []
    m.module.register_forward_pre_hook(lambda _mod, args: seen.append(args[1].clone()))
    conv = m.convention
    sig = conv.sigma_from_model_time(torch.tensor([999.0, 500.0])).tolist() + [0.0]
    sample(m, m.noise(4, 0), sig, "ddim")
    assert [float(t[0]) for t in seen] == pytest.approx([999.0, 500.0], abs=1e-3)


def test_callable_weights_round_trip(tmp_path):
    f = write_model_file(tmp_path, MODEL_SRC)
    m = load_model(f"{f}:make", prediction="flow", shape="2")
    state = {k: torch.full_like(v, 0.5) for k, v in m.module.state_dict().items()}
    save_safetensors(tmp_path / "w.safetensors", state)
    m2 = load_model(f"{f}:make", prediction="flow", shape="2", weights=tmp_path / "w.safetensors")
    assert torch.all(m2.module.lin.weight == 0.5)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01junk")
    with pytest.raises(StepsmithError, match="corrupt"):
        load_model(f"{f}:make", prediction="flow", shape="2", weights=tmp_path / "bad.safetensors")


@pytest.mark.parametrize("spec_suffix,kwargs,match", [
    (":nope", dict(prediction="flow", shape="2"), "no attribute 'nope'"),
    (":not_a_module", dict(prediction="flow", shape="2"), "not a torch nn.Module"),
    (":net", dict(shape="2"), "needs --prediction"),
    (":net", dict(prediction="flow"), "--shape"),
    (":net", dict(prediction="flow", shape="1,5,5"), "failed on a batch of shape"),
    (":Broken", dict(prediction="flow", shape="2"), "NaN/Inf"),
])
def test_callable_errors(tmp_path, spec_suffix, kwargs, match):
    f = write_model_file(tmp_path, MODEL_SRC)
    with pytest.raises(StepsmithError, match=match):
        load_model(f"{f}{spec_suffix}", **kwargs)


def test_spec_errors(tmp_path):
    with pytest.raises(StepsmithError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(StepsmithError, match="does not exist"):
        load_model(f"{tmp_path}/nofile.py:net", prediction="flow", shape="2")
    with pytest.raises(StepsmithError, match="unknown builtin"):
        load_model("builtin:sd15")
    with pytest.raises(StepsmithError, match="feature network"):
        load_model("builtin:digits-features")
    with pytest.raises(StepsmithError, match="--shape"):
        load_model(f"{tmp_path}/x.py:net", prediction="flow", shape="a,b")


def test_adapter_rejects_prediction_for_convention():
    with pytest.raises(StepsmithError, match="does not fit"):
        ModelAdapter(module=torch.nn.Identity(), convention=FlowConvention(), prediction="epsilon",
                     sample_shape=(2,), name="x")
