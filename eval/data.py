"""Real data for evaluation, and real-data feature statistics cached on disk.

* :func:`default_real_data` — the embedded models' true data (digits: all 1,797 images of
  ``digits_data()``; toy2d: ``toy2d_data(n, seed)``);
* :func:`load_real_data` — a user's data: a safetensors file holding one tensor [N, ...]
  (or exactly one named ``images``/``samples``/``x``/``data``/``real``), or a folder of PNG/JPEG
  images, scaled to [-1, 1] and resized to the model's size (:func:`schedules.io.load_samples`);
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
from eval.metrics import FeatureStats, extract_features
from schedules.io import StepsmithError, load_safetensors, load_samples, save_safetensors


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
        "in the model's range, or a folder of PNG/JPEG images)"
    )


def real_samples(model_name: str, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """The real samples an embedded model is scored against (all 1797 digits; ``n`` fresh 2-D points for toy2d)."""
    return default_real_data(model_name, n, seed)[0]


def load_real_data(path: str | os.PathLike, sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Real samples (at least 2) from a safetensors file or a folder of PNG/JPEG images, read by
    :func:`schedules.io.load_samples` (its key rule; images scaled to [-1, 1] and resized to ``sample_shape``);
    errors name ``real`` (``--real``)."""
    return load_samples(path, shape=sample_shape, min_count=2, param="real", asked_by="scoring (FID, KID, ...)")


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
