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


def embedded_data(model_name: str | None, n: int, seed: int):
    """(training data, description) of an embedded model — all 1,797 digits for the digits models (their
    thresholded ±1 copy for sharp-ddpm), ``n`` fresh two-moons points drawn with ``seed`` for toy2d — or
    ``None`` for any other model. Eval's real data, AYS's KLUB pairs and the data objectives all come from here."""
    from schedules.embedded import nets

    if model_name in ("builtin:digits-flow", "builtin:digits-ddpm", "builtin:digits-cond"):
        return nets.digits_data()[0], "digits_data() (all 1797 sklearn digits, 16x16, [-1, 1])"
    if model_name == "builtin:sharp-ddpm":
        return nets.sharp_digits_data()[0], "sharp_digits_data() (all 1797 sklearn digits, 16x16, thresholded to ±1)"
    if model_name == "builtin:toy2d-flow":
        return nets.toy2d_data(n, seed=seed), f"toy2d_data({n}, seed={seed})"
    return None


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
