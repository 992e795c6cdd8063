"""Real data for evaluation, and real-data feature statistics cached on disk.

* :func:`default_real_data` — the embedded models' true data (digits: all 1,797 images of
  ``digits_data()``; toy2d: ``toy2d_data(n, seed)``);
* :func:`load_real_data` — a user's data: a safetensors file holding one tensor [N, ...]
  (or a key ``images``/``samples``/``x``), or a folder of PNGs, scaled to [-1, 1];
* :func:`real_feature_stats` — features of the real data under a feature network, computed
  once and cached in ``$STEPSMITH_CACHE`` (default ``~/.cache/stepsmith``) under a key made
  of a hash of the data and a hash of the network's weights. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from eval.features import FeatureNetwork
from eval.metrics import FeatureStats, check_samples, extract_features
from schedules.io import StepsmithError, load_safetensors, save_safetensors

TENSOR_KEYS = ("images", "samples", "x", "data", "real")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("STEPSMITH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "stepsmith"


def tensor_hash(x: torch.Tensor) -> str:
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_real_data(model_name: str, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(real samples, description) for an embedded model; a clear error for other models."""
    from schedules.embedded import embedded_data

    found = embedded_data(model_name, n, seed)
    if found is not None:
        return found
    raise StepsmithError(
        f"no real data known for {model_name}: pass --real PATH (a safetensors file with one tensor [N, ...] "
        "in the model's range, or a folder of PNG images)"
    )


def real_samples(model_name: str, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """The real samples an embedded model is scored against (all 1797 digits; ``n`` fresh 2-D points for toy2d)."""
    return default_real_data(model_name, n, seed)[0]


def load_real_data(path: str | os.PathLike, sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Real samples from a safetensors file or a folder of PNGs (images scaled to [-1, 1])."""
    p = Path(path)
    if p.is_dir():
        x = _load_png_folder(p, sample_shape)
    elif p.is_file():
        tensors = load_safetensors(p)
        if len(tensors) == 1:
            x = next(iter(tensors.values()))
        else:
            key = next((k for k in TENSOR_KEYS if k in tensors), None)
            if key is None:
                raise StepsmithError(f"{p} holds tensors {sorted(tensors)}; keep one tensor or name it one of "
                                     f"{', '.join(TENSOR_KEYS)}")
            x = tensors[key]
        x = x.float()
    else:
        raise StepsmithError(f"--real {path}: no such file or folder")
    x = check_samples(x, f"real data {path}")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise StepsmithError(
            f"real data {path} has samples of shape {list(x.shape[1:])} but the model makes {list(sample_shape)}; "
            "resize the real data (same size and channel count)"
        )
    return x


def _load_png_folder(folder: Path, sample_shape: tuple[int, ...] | None) -> torch.Tensor:
    from PIL import Image

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() == ".png")
    if not files:
        raise StepsmithError(f"--real {folder}: the folder has no .png images")
    mode = None
    if sample_shape is not None and len(sample_shape) == 3:
        mode = {1: "L", 3: "RGB"}.get(sample_shape[0])
        if mode is None:
            raise StepsmithError(f"PNG real data fits 1- or 3-channel models, this one has {sample_shape[0]} channels")
    arrs = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert(mode or ("L" if im.mode in ("L", "1", "I", "I;16") else "RGB"))
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, -1)
        arrs.append(t.permute(2, 0, 1))
    sizes = {tuple(a.shape) for a in arrs}
    if len(sizes) > 1:
        raise StepsmithError(f"--real {folder}: images have different sizes {sorted(sizes)[:3]}...; resize them "
                             "all to the model's size")
    return torch.stack(arrs).float() / 127.5 - 1.0


def real_feature_stats(real: torch.Tensor, net: FeatureNetwork, *, cache: str | os.PathLike | None = None,
                       use_cache: bool = True, batch_size: int = 256) -> tuple[FeatureStats, dict]:
    """Feature statistics (and features) of ``real`` under ``net``, cached on disk.

    Returns the stats and a dict describing the cache entry (path, key, hit).
    """
    key = f"{tensor_hash(real)[:20]}-{net.weights_hash()[:20]}"
    path = cache_dir(cache) / "real_stats" / f"{key}.safetensors"
    info = {"key": key, "path": str(path), "hit": False}
    if use_cache and path.is_file():
        try:
            t = load_safetensors(path)
            stats = FeatureStats(n=int(t["n"]), sum=t["sum"], outer_sum=t["outer_sum"], features=t["features"])
            if stats.features.shape[0] == stats.n:
                info["hit"] = True
                return stats, info
        except (StepsmithError, KeyError):
            pass  # corrupt or foreign entry: recompute and overwrite
    stats = FeatureStats.from_features(extract_features(net, real, batch_size))
    if use_cache:
        save_safetensors(path, {"n": torch.tensor(stats.n), "sum": stats.sum, "outer_sum": stats.outer_sum,
                                "features": stats.features},
                         metadata={"feature_network": net.name, "weights_sha256": net.weights_hash(),
                                   "data_sha256": tensor_hash(real)})
    return stats, info
