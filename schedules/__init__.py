"""stepsmith core: time conventions, timestep tables, model adapters, solvers, search.

Public API::

    from schedules import load_model, load_table, sample, TimestepTable
    model = load_model("builtin:digits-flow")
    table = load_table("table.json")
    x = sample(model, model.noise(16, seed=0), table.sigmas, table.solver)
"""

from schedules.adapters import ModelAdapter, load_model
from schedules.conventions import FlowConvention, VPConvention
from schedules.io import StepsmithError
from schedules.solvers import SOLVERS, reference_sample, sample
from schedules.table import FORMAT, TimestepTable, load_table

__all__ = [
    "FORMAT", "SOLVERS", "FlowConvention", "ModelAdapter", "StepsmithError", "TimestepTable", "VPConvention",
    "load_model", "load_table", "reference_sample", "sample", "pipeline_kwargs", "apply_table",
]

_LAZY = {"pipeline_kwargs": "schedules.diffusers_integration", "apply_table": "schedules.diffusers_integration"}


def __getattr__(name: str):
    """``schedules.pipeline_kwargs`` / ``schedules.apply_table`` without importing diffusers up front."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'schedules' has no attribute {name!r}")
