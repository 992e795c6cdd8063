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
