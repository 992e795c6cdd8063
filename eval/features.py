"""Feature networks for FID / KID, loaded offline only.

:func:`load_feature_network` accepts

* ``"digits-features"`` — the embedded 128-d digits CNN (default for the digits models);
* ``"sharp-features"`` — the same CNN trained on the binarised digits (default for ``builtin:sharp-ddpm``);
* an ``nn.Module`` of your own (called on images, must return [B, D]);
* ``"inception"`` — the standard FID Inception-v3 (2048-d), from the optional
  ``inception`` extra (torch-fidelity + a torchvision matching your torch) and only when
  its weights are already on disk: ``weights=PATH`` (``--inception-weights``) or the file
  ``weights-inception-2015-12-05-6726825d.pth`` in the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``). stepsmith never downloads anything.

Every network comes back wrapped in a :class:`FeatureNetwork`, which checks its inputs
and outputs (shape, NaN) with clear errors and hands features to torchmetrics in float64.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from schedules.io import StepsmithError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_HELP = (
    "Inception FID needs (1) the optional extra `pip install 'stepsmith[inception]'` (torch-fidelity plus a "
    "torchvision wheel built for your torch) and (2) the weights file on disk: pass --inception-weights "
    f"PATH/{INCEPTION_FILE} or copy it into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints). "
    "stepsmith never downloads weights. Offline, use --features digits-features (embedded models) or your own "
    "nn.Module as --features path/to/file.py:attr"
)


class FeatureNetwork(nn.Module):
    """A feature extractor with checked inputs and outputs.

    ``input_shape`` (C, H, W) is enforced when known; the output must be [B, num_features]
    and finite. ``forward`` returns float64 features (torchmetrics then keeps float64).
    """

    def __init__(self, net: nn.Module, name: str, num_features: int | None = None,
                 input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.net = net.eval()
        self.name = name
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        d = num_features if num_features is not None else getattr(net, "num_features", None)
        if isinstance(d, torch.Tensor):
            d = int(d.item())
        self.num_features = int(d) if d is not None else None
        self._weights_hash: str | None = None

    def probe(self, example: torch.Tensor) -> int:
        """Learn ``num_features`` from a real batch when the network does not declare it."""
        if self.num_features is None:
            with torch.no_grad():
                out = self._run(example[:2])
            self.num_features = int(out.shape[1])
        return self.num_features

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.net(x)
        except StepsmithError:
            raise
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StepsmithError(f"feature network {self.name} failed on images of shape {list(x.shape)}: {msg}") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise StepsmithError(
                f"feature network {self.name} returned {got} for {x.shape[0]} images; it must return features "
                "[B, D] (flatten or pool its output)"
            )
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise StepsmithError(f"feature network {self.name} takes images [B, C, H, W], got {got}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise StepsmithError(
                f"feature network {self.name} takes images of shape {list(self.input_shape)}, got "
                f"{list(x.shape[1:])}; it fits only models with that image size and channel count"
            )
        if not torch.isfinite(x).all():
            raise StepsmithError(f"images given to {self.name} contain NaN/Inf — the sampler diverged")
        dev = _device(self.net)
        out = self._run(x.to(dev))
        if self.num_features is not None and out.shape[1] != self.num_features:
            raise StepsmithError(
                f"feature network {self.name} returned {out.shape[1]} features but declares num_features="
                f"{self.num_features}; fix num_features or the network's output"
            )
        if not torch.isfinite(out).all():
            raise StepsmithError(f"feature network {self.name} returned NaN/Inf features")
        return out.detach().cpu().to(torch.float64)

    def weights_hash(self) -> str:
        """sha256 over the network's class, parameter names, shapes and values (cache key)."""
        if self._weights_hash is None:
            h = hashlib.sha256(type(self.net).__qualname__.encode())
            for k, v in sorted(self.net.state_dict().items()):
                h.update(k.encode())
                t = v.detach().cpu().contiguous()
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_hash = h.hexdigest()
        return self._weights_hash


def _device(net: nn.Module) -> torch.device:
    try:
        return next(net.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------- loaders




def default_feature_network(model_name: str, sample_shape: tuple[int, ...]) -> str:
    """The feature network a sweep uses when none is given: the model's own, digits-features for
    other 16x16 one-channel images, else inception (which needs local weights)."""
    from schedules.embedded import MODEL_FEATURES

    if model_name in MODEL_FEATURES:
        return MODEL_FEATURES[model_name]
    return "digits-features" if tuple(sample_shape) == (1, 16, 16) else "inception"


def digits_features(name: str = "digits-features") -> FeatureNetwork:
    """An embedded digits CNN (128-d penultimate layer), images [B, 1, 16, 16] in [-1, 1]:
    ``digits-features`` (trained on the digits) or ``sharp-features`` (on the binarised digits)."""
    from schedules.embedded import load_feature_cnn
    from schedules.embedded.nets import DIGITS_SIZE, DigitsFeatures

    net = load_feature_cnn(name)
    return FeatureNetwork(net, name, DigitsFeatures.num_features, (1, DIGITS_SIZE, DIGITS_SIZE))


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path | None:
    """The local Inception weights file: ``weights`` if given (must exist), else the torch
    hub cache entry if present, else ``None``. Never touches the network."""
    if weights is not None:
        p = Path(weights)
        if p.is_dir():
            p = p / INCEPTION_FILE
        if not p.is_file():
            raise StepsmithError(f"--inception-weights {weights}: no such file. {INCEPTION_HELP}")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


class _InceptionOnImages(nn.Module):
    """[-1, 1] images with 1 or 3 channels → uint8 RGB → torch-fidelity Inception (it resizes to 299)."""

    num_features = 2048

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise StepsmithError(f"Inception takes 1- or 3-channel images, got {x.shape[1]} channels")
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.inception(u8).reshape(x.shape[0], -1)


def inception_features(weights: str | os.PathLike | None = None) -> FeatureNetwork:
    """Inception-v3 FID features from local weights only; a clear error otherwise."""
    path = inception_weights_path(weights)
    if path is None:
        raise StepsmithError(f"no local Inception weights (looked in {Path(torch.hub.get_dir()) / 'checkpoints'}). "
                             f"{INCEPTION_HELP}")
    try:
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import NoTrainInceptionV3
    except Exception as exc:  # ImportError, or a torchvision that does not fit this torch
        raise StepsmithError(f"cannot import the Inception network ({type(exc).__name__}: {exc}). {INCEPTION_HELP}") from None
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path))
    return FeatureNetwork(_InceptionOnImages(net), "inception", 2048, None)


def load_feature_network(spec: str | nn.Module | None = "digits-features", *,
                         inception_weights: str | os.PathLike | None = None,
                         device: str | torch.device = "cpu") -> FeatureNetwork:
    """``digits-features``, ``inception`` or an ``nn.Module`` → a checked :class:`FeatureNetwork`.

    A string naming a ``.safetensors`` file is refused with advice: a state dict alone does
    not say which architecture to build — pass the module from Python instead.
    """
    if isinstance(spec, FeatureNetwork):
        fn = spec
    elif isinstance(spec, nn.Module):
        fn = FeatureNetwork(spec, type(spec).__name__)
    elif spec is None or spec in ("digits-features", "builtin:digits-features"):
        fn = digits_features()
    elif spec in ("sharp-features", "builtin:sharp-features"):
        fn = digits_features("sharp-features")
    elif spec in ("inception", "inception-v3", "2048"):
        fn = inception_features(inception_weights)
    elif isinstance(spec, str) and ".py:" in spec:
        fn = _user_file_network(spec)
    elif isinstance(spec, str):
        raise StepsmithError(
            f"unknown feature network {spec!r}: use digits-features, sharp-features, inception (with local weights), "
            "path/to/file.py:attr (an nn.Module returning [B, D]), or pass an nn.Module from Python"
        )
    else:
        raise StepsmithError(f"feature network must be a name or an nn.Module, got {type(spec).__name__}")
    fn.net.to(device)
    return fn


def _user_file_network(spec: str) -> FeatureNetwork:
    """``path/to/file.py:attr`` — an nn.Module or a zero-argument factory returning one."""
    from schedules.adapters import _import_file

    file, attr = spec.rsplit(":", 1)
    if not Path(file).is_file():
        raise StepsmithError(f"feature network file {file} does not exist")
    obj = _import_file(Path(file))
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise StepsmithError(f"{file} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise StepsmithError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, nn.Module):
        raise StepsmithError(f"{spec} is not an nn.Module or a function returning one")
    return FeatureNetwork(obj, spec)
