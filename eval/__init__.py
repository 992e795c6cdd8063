"""stepsmith evaluation: FID / KID (torchmetrics, float64), exact low-dimensional distances,
flow straightness, teacher fidelity, and NFE sweeps with reports.

    from eval import run_sweep
    report = run_sweep("builtin:digits-flow", methods=["uniform", "karras", "dp"], nfe=[4, 6, 8],
                       num=1000, out="runs/eval")

See :mod:`eval.metrics`, :mod:`eval.features`, :mod:`eval.sweep`, :mod:`eval.report`.
"""

from eval.sweep import DEFAULT_EVAL_SEED, run_sweep

__all__ = ["DEFAULT_EVAL_SEED", "run_sweep"]
