"""``method="interp"``: a table carried to another budget by log-linear interpolation.

Align Your Steps (Sabour et al. 2024, "Align Your Steps: Optimizing Sampling Schedules in
Diffusion Models") obtains step counts it did not optimise by interpolating log σ of an optimised
list linearly over the normalised step index; this method does the same for any table. The K
evaluated nodes of the source (its terminal 0 excluded) are placed at u = 0, 1/(K-1), ..., 1, the
new budget's nodes at u = 0, 1/(K'-1), ..., 1, and σ = exp(interp(u, log σ)). The convention then
snaps the nodes (:meth:`snap_nodes`: VP tables land on distinct integer timesteps; flow nodes are
clipped to [0, 1]) and appends the terminal 0. No model call is made.
"""

from __future__ import annotations

import numpy as np

from schedules.baselines import steps_for
from schedules.io import StepsmithError
from schedules.table import TimestepTable, as_table


def loglinear_nodes(nodes: list[float], K: int) -> list[float]:
    """``K`` nodes log-linearly interpolated over the normalised index of ``nodes`` (descending, all > 0)."""
    if K == 1 or len(nodes) == 1:
        return [float(nodes[0])][:K]
    xs = np.linspace(0.0, 1.0, len(nodes))
    ys = np.log(np.asarray(nodes, dtype=np.float64))
    return np.exp(np.interp(np.linspace(0.0, 1.0, K), xs, ys)).tolist()


def interp_table(adapter, nfe: int, solver: str = "euler", *, samples: int = 0, seed: int = 0,  # noqa: ARG001
                 progress: bool = False, source=None) -> TimestepTable:  # noqa: ARG001
    """``source`` (a table, its dict or a JSON path) interpolated to ``nfe`` evaluations with ``solver``.

    Refused if ``source`` was made for another model: another convention, noise schedule or prediction
    (:meth:`TimestepTable.check_compatible`), or another model name. The table keeps the source's
    ``conditioning`` block, seed and samples (a ``UserWarning`` when the model's conditioning differs).
    """
    if source is None:
        raise StepsmithError("method 'interp' needs a source table (--from TABLE, or source=...)", param="source")
    src = as_table(source, param="source")
    src.check_compatible(adapter.convention, adapter.prediction, what=f"model {adapter.name}")
    if src.model and adapter.name and src.model != adapter.name:
        raise StepsmithError(f"table {src.method!r} was made for model {src.model!r}, not {adapter.name!r}; "
                             "interpolate a table of this model", param="source")
    K = steps_for(adapter, nfe, solver)
    if K > 1 and len(src.sigmas) == 2:
        raise StepsmithError("a one-step table has no spacing to interpolate; give a table of 2+ steps",
                             param="source")
    nodes = loglinear_nodes(src.sigmas[:-1], K)
    sigmas = adapter.convention.snap_nodes(nodes)
    if len(sigmas) != K + 1:
        raise StepsmithError(f"{K} distinct steps do not fit the model's timesteps", param="nfe")
    # the steps come from the source's search: its seed and samples (eval's seed check), and its conditioning —
    # an interpolated guidance-3 table is not a table searched at this run's guidance (warned when they differ)
    src.check_conditioning(getattr(adapter, "conditioning", None))
    prov = {"source": {"method": src.method, "nfe": src.nfe, "solver": src.solver, "steps": src.steps,
                       "sigmas": src.sigmas},
            "interpolation": "log-linear in σ over the normalised step index (AYS)", "model_calls": 0,
            "seed": src.provenance.get("seed"), "samples": src.provenance.get("samples")}
    table = TimestepTable.from_sigmas(sigmas, convention=adapter.convention, prediction=adapter.prediction,
                                      solver=solver, method="interp", model=adapter.name, objective=None,
                                      provenance=prov)
    table.conditioning = None if src.conditioning is None else dict(src.conditioning)
    return table
