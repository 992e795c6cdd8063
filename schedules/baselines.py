"""Hand-crafted schedules (baselines). Each is a pure function of (adapter, nfe, solver).

Every generator returns a validated :class:`~schedules.table.TimestepTable` whose budget
is counted in NFE for the given solver (Heun: K = (NFE+1)//2 steps).
"""

from __future__ import annotations

import torch

from schedules.adapters import ModelAdapter
from schedules.io import StepsmithError
from schedules.solvers import get_solver
from schedules.table import TimestepTable


def steps_for(adapter: ModelAdapter, nfe: int, solver: str) -> int:
    K = get_solver(solver).steps_for_nfe(nfe)
    if adapter.convention.name == "vp" and K > adapter.convention.num_train_timesteps:
        raise StepsmithError(f"{K} steps exceed the model's {adapter.convention.num_train_timesteps} timesteps")
    return K


def uniform(adapter: ModelAdapter, nfe: int, solver: str = "euler") -> TimestepTable:
    """Uniform in the model's own time: σ for flow; integer timesteps T-1..0 for VP."""
    K = steps_for(adapter, nfe, solver)
    conv = adapter.convention
    if conv.name == "flow":
        sigmas = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64).tolist()
    else:
        T = conv.num_train_timesteps
        ts = torch.linspace(T - 1, 0, K, dtype=torch.float64).round()
        sigmas = conv.sigma_from_model_time(ts).tolist() + [0.0]
    return TimestepTable.from_sigmas(sigmas, convention=conv, prediction=adapter.prediction, solver=solver,
                                     method="uniform", model=adapter.name)


BASELINES = {"uniform": uniform}
