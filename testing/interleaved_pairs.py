"""Two routes timed in turn, the order swapped every pair (bench/gpu.py --paired, checked by the tests).

Eager sampling follows the shared host CPU's speed, which drifts within a run by more than two routes
differ; runs taken in turn see the same drift, so the ratio within each pair is the fair comparison.
"""
from __future__ import annotations

import statistics
from typing import Callable

BATCHES = (1, 4)
ROUTES = ("native", "fewstep")


def interleaved_pairs(run: Callable[[str, int, int], float], pairs: int, warm_seed: int, first_seed: int) -> dict:
    """`run(route, batch, seed)` → ms. Per batch size: one warm-up run of each route, then `pairs`
    pairs; the medians of each route and of the per-pair ratios fewstep / native."""
    paired = {}
    for batch in BATCHES:
        for route in ROUTES:  # warm: models loaded, nothing compiled (eager)
            run(route, batch, warm_seed)
        times = {route: [] for route in ROUTES}
        for i in range(pairs):
            for route in (ROUTES if i % 2 == 0 else ROUTES[::-1]):
                times[route].append(run(route, batch, first_seed + i))
        ratios = [f / n for f, n in zip(times["fewstep"], times["native"])]
        paired[f"b{batch}"] = {"pairs": pairs, "native_ms": _median(times["native"]),
                               "fewstep_ms": _median(times["fewstep"]), "ratio_median": _median(ratios),
                               "ratio_quartiles": (statistics.quantiles(ratios, n=4, method="inclusive")
                                                   if len(ratios) > 1 else ratios * 3)}
    return paired


def _median(values):
    return statistics.median(values) if values else float("nan")
