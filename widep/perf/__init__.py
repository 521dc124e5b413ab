"""Analytic performance model of wide-EP MoE serving, its calibration data, and the topology sweep.

- :mod:`widep.perf.calibration` — efficiencies and kernel tables as data (published, or GPU-measured).
- :mod:`widep.perf.model` — step time per rank (HBM, FLOPs, all-to-all, overlap, overheads) and serving
  metrics (tokens/s/GPU, tokens/s/user, TTFT, TPOT) at a concurrency; ``predict_plan`` for a plan.
- :mod:`widep.perf.enumerate` — every candidate topology of a GPU budget, with feasibility reasons.
- :mod:`widep.perf.sweep` — the sweep loop (pluggable executors: predict now, measure later), results
  on disk, Pareto frontier, plots; ``widep sweep`` lives in :mod:`widep.perf.cli`.
"""
