"""stepsmith core: time conventions, timestep tables, model adapters, solvers, search.

Public API::

    from schedules import load_model, make_table, load_table, sample, pipeline_kwargs, apply_table, TimestepTable
    model = load_model("builtin:digits-flow")
    table = make_table(model, "dp", nfe=6)                    # or load_table("table.json")
    x = sample(model, model.noise(16, seed=0), table.sigmas, table.solver)
    images = pipe(**pipeline_kwargs(table, pipe)).images     # a diffusers pipeline, driven by the table

``pipeline_kwargs`` and ``apply_table`` are imported on first use, so ``import schedules`` does not
import diffusers.
"""

from schedules.adapters import ModelAdapter, load_model
from schedules.conventions import FlowConvention, VPConvention
from schedules.embedded import embedded_path
from schedules.io import StepsmithError
from schedules.search import make_table
from schedules.solvers import SOLVERS, reference_sample, sample
from schedules.table import FORMAT, TimestepTable, load_table

__all__ = [
    "FORMAT", "SOLVERS", "FlowConvention", "ModelAdapter", "StepsmithError", "TimestepTable", "UnconditionalFlowMatchPipeline",
    "VPConvention", "apply_table", "embedded_path", "load_model", "load_table", "make_table", "pipeline_kwargs",
    "reference_sample", "sample",
]

_LAZY = {"pipeline_kwargs": "schedules.diffusers", "apply_table": "schedules.diffusers",
         "UnconditionalFlowMatchPipeline": "schedules.pipeline"}


def __getattr__(name: str):
    """``pipeline_kwargs``, ``apply_table`` and the embedded models' pipeline class without importing diffusers up front."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'schedules' has no attribute {name!r}")
