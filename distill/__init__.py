"""Flow straightening and distillation (BOSS, reflow, k-step) on top of :mod:`schedules`.

Python API::

    from distill import DistillConfig, distill, load_distilled
    res = distill(adapter, table, DistillConfig(method="boss", steps=2000), out="straight/")
    student = load_distilled("straight/")     # a ModelAdapter, same convention as the teacher

Methods: :class:`distill.boss.BOSSStraightening`, :class:`distill.reflow.Reflow`,
:class:`distill.kstep.KStepDistillation`.
"""

from distill.export import load_distilled
from distill.trainer import DistillConfig, DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill", "load_distilled"]
