"""stepsmith's benchmarks: measurements of the packages, outside them.

* :mod:`benchmarks.suite` — ``stepsmith bench``: P1–P5 on the embedded models → ``BENCHMARKS.md``;
* :mod:`benchmarks.distill` — BOSS vs reflow vs k-step at equal budget (``python -m benchmarks.distill``);
* :mod:`benchmarks.overhead` — run-time cost of a plugged table in a diffusers pipeline;
* :mod:`benchmarks.resume` — a dp or ays checkpoint's cost and what a resumed search spends;
* :mod:`benchmarks.measure_embedded` — FID floors of the embedded digits models.

Benchmarks may import :mod:`schedules`, :mod:`eval` and :mod:`distill`; none of those imports
them. Committed results live in ``benchmarks/results``.
"""
