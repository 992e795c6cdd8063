"""stepsmith evaluation: FID / KID (torchmetrics, float64), exact low-dimensional distances,
flow straightness, teacher fidelity, and NFE sweeps with reports.

    from eval import run_sweep
    report = run_sweep("builtin:digits-flow", methods=["uniform", "karras", "dp"], nfe=[4, 6, 8],
                       num=1000, out="runs/eval")

A metric list scores every row several ways from the same samples and aggregates them by MMHM
per NFE: ``run_sweep(..., metric="fid,kid,precision,recall,density,coverage,is,mmhm")``.

See :mod:`eval.metrics`, :mod:`eval.features`, :mod:`eval.manifold`, :mod:`eval.classifier_metrics`,
:mod:`eval.mmhm`, :mod:`eval.sweep`, :mod:`eval.sweep_metrics`, :mod:`eval.report`.
"""

from eval.data import load_real_data, real_samples
from eval.features import load_feature_network
from eval.metrics import fid, kid, wasserstein
from eval.sweep import DEFAULT_EVAL_SEED, SweepConfig, run_sweep

__all__ = ["DEFAULT_EVAL_SEED", "SweepConfig", "fid", "kid", "load_feature_network", "load_real_data", "real_samples",
           "run_sweep", "wasserstein"]
