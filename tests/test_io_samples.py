"""schedules.io.load_samples: the one loader of user data files (eval --real, search --data), each bad input
refused with one StepsmithError naming the option; safetensors and image-folder round trips; the call sites."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from schedules.io import StepsmithError, check_sample_tensor, load_samples, save_safetensors

torch.set_num_threads(1)


def _gen(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _pngs(folder: Path, arrays: list[np.ndarray], suffix: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img{i:03d}{suffix}")
    return folder


# -- safetensors --------------------------------------------------------------------------------------------------

def test_safetensors_round_trip_and_key_rule(tmp_path):
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    save_safetensors(tmp_path / "one.safetensors", {"whatever": x})
    got = load_samples(tmp_path / "one.safetensors", shape=(1, 4, 4), min_count=5)
    assert got.dtype == torch.float32 and torch.equal(got, x)
    # float64 and integer tensors come back as float32 values
    save_safetensors(tmp_path / "f64.safetensors", {"x": x.double()})
    assert torch.equal(load_samples(tmp_path / "f64.safetensors"), x)
    # several tensors: exactly one of the known names is used
    labels = torch.arange(5)
    save_safetensors(tmp_path / "named.safetensors", {"labels": labels, "images": x})
    assert torch.equal(load_samples(tmp_path / "named.safetensors", shape=(1, 4, 4)), x)
    save_safetensors(tmp_path / "two_named.safetensors", {"images": x, "x": x + 1})
    save_safetensors(tmp_path / "none_named.safetensors", {"a": x, "b": x.clone()})
    for f in ("two_named", "none_named"):
        with pytest.raises(StepsmithError, match="keep one tensor or name exactly one") as e:
            load_samples(tmp_path / f"{f}.safetensors")
        assert e.value.param == "data"


def test_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    f = tmp_path / "evil.safetensors"
    f.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(StepsmithError, match="not a readable safetensors file") as e:
        load_samples(f, param="real")
    assert e.value.param == "real" and "`real`" in str(e.value) and not marker.exists()
    torch.save(torch.zeros(3, 2), tmp_path / "t.pt")
    with pytest.raises(StepsmithError, match="not a readable safetensors file"):
        load_samples(tmp_path / "t.pt")


# -- one error per bad input ----------------------------------------------------------------------------------------

def test_each_bad_input_is_one_clear_error(tmp_path):
    x = torch.zeros(4, 2)
    save_safetensors(tmp_path / "ok.safetensors", {"x": x})
    bad_nan = x.clone()
    bad_nan[1, 0] = float("nan")
    bad_nan[3, 1] = float("inf")
    save_safetensors(tmp_path / "nan.safetensors", {"x": bad_nan})
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    Image.new("L", (4, 4)).save(tmp_path / "single.png")
    cases = [
        (dict(path=tmp_path / "missing.safetensors"), "no such file or folder"),
        (dict(path=""), "`data` is empty; give a .safetensors file"),
        (dict(path=tmp_path / "empty"), "holds no .png/.jpg/.jpeg images"),
        (dict(path=tmp_path / "notes"), "holds no .png/.jpg/.jpeg images"),
        (dict(path=tmp_path / "single.png"), "is one image; give the folder"),
        (dict(path=tmp_path / "ok.safetensors", shape=(3,)), r"has samples of shape \[2\] but the model makes \[3\]"),
        (dict(path=tmp_path / "ok.safetensors", min_count=5, asked_by="the search"),
         "holds 4 samples but the search asks for 5"),
        (dict(path=tmp_path / "nan.safetensors"), "NaN/Inf values in 2 of 4 samples"),
    ]
    for kw, match in cases:
        path = kw.pop("path")
        with pytest.raises(StepsmithError, match=match) as e:
            load_samples(path, param="data", **kw)
        assert e.value.param == "data", match
        assert str(e.value).startswith("`data`"), match  # the CLI turns it into --data
    assert load_samples(tmp_path / "ok.safetensors", shape=(2,), min_count=4).shape == (4, 2)


def test_check_sample_tensor():
    with pytest.raises(StepsmithError, match="expected a tensor") as e:
        check_sample_tensor([1.0, 2.0], param="x0")
    assert e.value.param == "x0"
    with pytest.raises(StepsmithError, match="single number"):
        check_sample_tensor(torch.tensor(1.0))
    with pytest.raises(StepsmithError, match="holds 0 samples"):
        check_sample_tensor(torch.zeros(0, 2))
    out = check_sample_tensor(torch.ones(3, 2, dtype=torch.int64), shape=(2,), min_count=3)
    assert out.dtype == torch.float32 and torch.equal(out, torch.ones(3, 2))


# -- image folders --------------------------------------------------------------------------------------------------

def test_png_folder_round_trip_gray_and_rgb(tmp_path):
    gray = [_gen(i).integers(0, 256, (6, 5), dtype=np.uint8) for i in range(3)]
    x = load_samples(_pngs(tmp_path / "gray", gray), shape=(1, 6, 5))
    want = torch.from_numpy(np.stack(gray)).float()[:, None] / 127.5 - 1.0
    assert x.shape == (3, 1, 6, 5) and torch.equal(x, want)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(load_samples(tmp_path / "gray"), want)  # no shape: all grayscale → one channel
    rgb = [_gen(10 + i).integers(0, 256, (4, 4, 3), dtype=np.uint8) for i in range(2)]
    x = load_samples(_pngs(tmp_path / "rgb", rgb), shape=(3, 4, 4))
    assert torch.equal(x, torch.from_numpy(np.stack(rgb)).float().permute(0, 3, 1, 2) / 127.5 - 1.0)
    # extremes map to exactly -1 and 1
    ends = load_samples(_pngs(tmp_path / "ends", [np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8)]))
    assert ends[0].eq(-1.0).all() and ends[1].eq(1.0).all()


def test_channel_handling(tmp_path):
    rgb = _gen(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    folder = _pngs(tmp_path / "rgb", [rgb])
    as_gray = load_samples(folder, shape=(1, 4, 4))  # RGB read as luma
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    assert torch.equal(as_gray[0, 0], torch.from_numpy(luma) / 127.5 - 1.0)
    g = _gen(2).integers(0, 256, (4, 4), dtype=np.uint8)
    as_rgb = load_samples(_pngs(tmp_path / "g", [g]), shape=(3, 4, 4))  # grayscale replicated
    assert torch.equal(as_rgb[0, 0], as_rgb[0, 1]) and torch.equal(as_rgb[0, 0], as_rgb[0, 2])
    rgba = np.concatenate([rgb, np.zeros((4, 4, 1), np.uint8)], axis=2)  # alpha dropped, not composited
    x = load_samples(_pngs(tmp_path / "rgba", [rgba]), shape=(3, 4, 4))
    assert torch.equal(x[0], torch.from_numpy(rgb).float().permute(2, 0, 1) / 127.5 - 1.0)
    mixed = _pngs(tmp_path / "mixed", [g, rgb])  # no shape: any colour image → RGB for all
    assert load_samples(mixed).shape == (2, 3, 4, 4)
    with pytest.raises(StepsmithError, match="images fit"):
        load_samples(mixed, shape=(4, 4, 4))
    with pytest.raises(StepsmithError, match="give a .safetensors file"):
        load_samples(mixed, shape=(2,))


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    a = np.array([[0, 65535], [32768, 16384]], dtype=np.uint16)
    x = load_samples(_pngs(tmp_path / "p16", [a]), shape=(1, 2, 2))
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 0, 1] == 1.0
    assert x[0, 0, 1, 0].item() == pytest.approx(32768 / 32767.5 - 1, abs=1e-6)
    assert x[0, 0, 1, 1].item() == pytest.approx(16384 / 32767.5 - 1, abs=1e-6)  # not clipped at 255 as convert("L") does


def test_resampling_to_the_model_shape(tmp_path):
    # a horizontal ramp 16x16 → 8x8: bicubic in float, as PIL computes it; a constant image stays constant
    ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    x = load_samples(_pngs(tmp_path / "ramp", [ramp, np.full((16, 16), 200, np.uint8)]), shape=(1, 8, 8))
    assert x.shape == (2, 1, 8, 8)
    ref = np.asarray(Image.fromarray(ramp.astype(np.float32)).resize((8, 8), Image.Resampling.BICUBIC))
    assert torch.allclose(x[0, 0], torch.from_numpy(np.clip(ref, 0, 255)) / 127.5 - 1.0, atol=1e-6)
    assert torch.all(x[0, 0, :, 1:] > x[0, 0, :, :-1])  # still increasing left to right
    assert torch.allclose(x[1], torch.full((1, 8, 8), 200 / 127.5 - 1.0), atol=1e-5)
    # another aspect ratio: centre crop first (the black side bands of a 16 x 32 image are cut away)
    wide = np.zeros((16, 32), np.uint8)
    wide[:, 8:24] = 255
    w = load_samples(_pngs(tmp_path / "wide", [wide]), shape=(1, 8, 8))
    assert w.shape == (1, 1, 8, 8) and torch.allclose(w, torch.ones_like(w), atol=1e-5)
    tall = load_samples(_pngs(tmp_path / "tall", [wide.T.copy()]), shape=(1, 4, 8))  # 32 x 16 → 4 x 8: crop rows
    assert tall.shape == (1, 1, 4, 8)
    # upsampling works too, and stays in [-1, 1] (bicubic overshoot is clipped)
    step = np.zeros((4, 4), np.uint8)
    step[:, 2:] = 255
    up = load_samples(_pngs(tmp_path / "step", [step]), shape=(1, 16, 16))
    assert up.shape == (1, 1, 16, 16) and up.min() == -1.0 and up.max() == 1.0


def test_jpeg_and_folder_rules(tmp_path):
    smooth = np.tile(np.linspace(40, 220, 8).astype(np.uint8), (8, 1))
    folder = _pngs(tmp_path / "jpg", [smooth, smooth], suffix=".jpg")
    Image.fromarray(smooth).save(folder / "upper.JPEG")
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.png").write_bytes(b"not an image, but hidden")
    (folder / "sub").mkdir()
    Image.new("L", (3, 3)).save(folder / "sub" / "ignored.png")
    x = load_samples(folder, shape=(1, 8, 8))
    assert x.shape == (3, 1, 8, 8)
    assert torch.allclose(x[0, 0], torch.from_numpy(smooth).float() / 127.5 - 1.0, atol=0.1)  # lossy, but close
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(StepsmithError, match="broken.png is not a readable image") as e:
        load_samples(folder, shape=(1, 8, 8))
    assert e.value.param == "data"
    (folder / "broken.png").unlink()
    Image.new("L", (4, 4)).save(folder / "small.png")
    with pytest.raises(StepsmithError, match="different sizes"):
        load_samples(folder, shape=(1, 8, 8))
    with pytest.raises(StepsmithError, match="holds 3 samples but"):
        load_samples(_pngs(tmp_path / "three", [smooth] * 3), min_count=4)


# -- the call sites --------------------------------------------------------------------------------------------------

def test_eval_real_data_uses_the_loader(tmp_path):
    from eval.data import load_real_data

    folder = _pngs(tmp_path / "real", [np.full((32, 32), v, np.uint8) for v in (0, 255)])
    x = load_real_data(folder, (1, 16, 16))  # resized to the model's size
    assert x.shape == (2, 1, 16, 16) and torch.allclose(x[:, 0, 0, 0], torch.tensor([-1.0, 1.0]), atol=1e-5)
    with pytest.raises(StepsmithError, match="holds 1 sample but scoring") as e:
        load_real_data(_pngs(tmp_path / "one", [np.zeros((4, 4), np.uint8)]), (1, 4, 4))
    assert e.value.param == "real" and str(e.value).startswith("`real`")


def test_ays_data_samples_read_an_image_folder(tmp_path):
    from schedules.search.ays import data_samples

    folder = _pngs(tmp_path / "d", [_gen(i).integers(0, 256, (12, 12), dtype=np.uint8) for i in range(6)])
    ad = SimpleNamespace(sample_shape=(1, 8, 8), name="user-model")
    x, src = data_samples(ad, str(folder), 4, 0)
    assert x.shape == (4, 1, 8, 8) and src.endswith(": 4 of 6 samples") and x.abs().max() <= 1.0
    with pytest.raises(StepsmithError, match="holds 6 samples but the search asks for 8"):
        data_samples(ad, str(folder), 8, 0)
    with pytest.raises(StepsmithError, match="NaN/Inf"):
        data_samples(ad, torch.full((8, 1, 8, 8), float("nan")), 4, 0)


def test_cli_search_data_objective_files_are_checked(tmp_path, capsys, monkeypatch):
    from schedules.cli import main
    from schedules.search import objectives

    monkeypatch.setattr(objectives, "_USER_DATA", {})
    out = tmp_path / "t.json"
    base = ["search", "--model", "builtin:toy2d-flow", "--nfe", "3", "--objective", "data-wasserstein",
            "--samples", "8", "--grid", "12", "--no-progress", "--out", str(out)]
    save_safetensors(tmp_path / "wrong.safetensors", {"x": torch.zeros(50, 3)})
    save_safetensors(tmp_path / "two.safetensors", {"a": torch.zeros(50, 2), "b": torch.zeros(50, 2)})
    folder = _pngs(tmp_path / "pngs", [np.zeros((4, 4), np.uint8)] * 3)
    for data, match in [(tmp_path / "missing.safetensors", "--data"), (tmp_path / "wrong.safetensors", "shape [3]"),
                        (tmp_path / "two.safetensors", "keep one tensor"), (folder, "give a .safetensors file")]:
        rc = main([*base, "--data", str(data)])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and "--data" in err and not out.exists(), (data, err)
    # a file with a named tensor among others is now accepted by the data objectives too
    moons = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    save_safetensors(tmp_path / "named.safetensors", {"labels": torch.zeros(64), "samples": moons})
    assert main([*base, "--data", str(tmp_path / "named.safetensors")]) == 0
    capsys.readouterr()
    assert out.exists()
