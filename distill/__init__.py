"""Flow straightening and distillation (BOSS, reflow, k-step) on top of :mod:`schedules`.

Python API::

    from distill import DistillConfig, distill, load_distilled
    res = distill(adapter, table, DistillConfig(method="boss", steps=2000), out="straight/")
    student = load_distilled("straight/")     # a ModelAdapter, same convention as the teacher

Methods: :class:`distill.boss.BOSSStraightening`, :class:`distill.reflow.Reflow`,
:class:`distill.kstep.KStepDistillation`.

Conditional models distill through their conditional adapter (per-sample conditions, guidance
baked into the teacher and trained into the student)::

    teacher = load_model("builtin:digits-cond", conditioning=Conditioning(labels="all", guidance=3))
    distill(teacher, table, DistillConfig(method="boss", steps=300), out="straight/")
    student = load_distilled("straight/")     # under the same classes and guidance

Pipeline models (SD, SDXL, SD3, Flux) with ``lora_rank`` > 0 also get ``OUT/lora/`` for
``pipe.load_lora_weights``.
"""

from distill.export import load_distilled
from distill.trainer import DistillConfig, DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill", "load_distilled"]
