"""Embedded default models, trained here and shipped with the package.

``builtin:<name>`` on the command line (or :func:`schedules.load_model`) resolves to
one of these folders. ``python -m schedules.embedded.train <name>`` retrains one; the
command and seed that produced the shipped weights are in ``<name>/training.json``.
"""

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
BUILTIN_MODELS = ("toy2d-flow", "digits-flow", "digits-ddpm", "digits-cond", "sharp-ddpm")
CONDITIONAL_MODELS = ("digits-cond",)  # class-conditional: need --classes (and --guidance)
FEATURE_NETWORKS = ("digits-features", "sharp-features")


def embedded_path(name: str) -> Path:
    return EMBEDDED_DIR / name


# embedded models and the feature network trained on their data (FID features, search objectives)
MODEL_FEATURES = {"builtin:sharp-ddpm": "sharp-features", "builtin:digits-flow": "digits-features",
                  "builtin:digits-ddpm": "digits-features", "builtin:digits-cond": "digits-features"}


def load_feature_cnn(name: str):
    """The embedded digits CNN ``name`` (one of :data:`FEATURE_NETWORKS`) with its weights, in eval mode."""
    from schedules.adapters import load_state_dict
    from schedules.embedded.nets import DigitsFeatures
    from schedules.io import StepsmithError, load_safetensors

    if name not in FEATURE_NETWORKS:
        raise StepsmithError(f"unknown feature network {name!r}; use one of "
                             f"{', '.join('builtin:' + f for f in FEATURE_NETWORKS)}", param="features")
    path = embedded_path(name) / "model.safetensors"
    if not path.is_file():
        raise StepsmithError(f"embedded feature network missing: {path}; reinstall stepsmith or retrain it with "
                             f"`python -m schedules.embedded.train {name}`", param="features")
    net = DigitsFeatures()
    load_state_dict(net, load_safetensors(path), str(path))
    return net.eval()
