"""The benchmarks' timing harness: contenders alternated in one process, repeated, medians.

Every comparison under bench/ times its contenders the same way: each contender is a
zero-argument callable that runs once and returns the seconds it measured itself (so that it can
leave set-up out, or synchronise a GPU around its work), and `alternate` calls them in rounds
whose order flips each round (A B, B A, ...). Load from other jobs on the machine then slows
every contender alike, and a ratio taken per round, or of the medians, stays fair.

Used by bench_cache.py, bench_distill.py, bench_distill_gpu.py, bench_dpade.py and gpu_check.py.
They import it as `timing`, since each runs as a script from bench/ (or puts bench/ on the path,
as gpu_check.py does on a bare GPU machine), so it needs nothing but the standard library.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping


def alternate(
    runs: Mapping[str, Callable[[], float]],
    rounds: int,
    warmup: int = 0,
    after_round: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each contender over `rounds` rounds, after `warmup` rounds that are not kept.

    Round i calls the contenders in their order when i is even and in reverse when it is odd,
    warm-up rounds counted. `after_round(i, seconds)`, when given, runs after every round with
    that round's seconds per contender (warm-up rounds included, i < warmup).
    """
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        this = {}
        for name in names if i % 2 == 0 else names[::-1]:
            this[name] = runs[name]()
        if i >= warmup:
            for name in names:
                seconds[name].append(this[name])
        if after_round is not None:
            after_round(i, this)
    return seconds


def medians(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    """The median of each contender's seconds."""
    return {name: statistics.median(values) for name, values in seconds.items()}


def pair_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """numerator / denominator per round (both lists from one `alternate`)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]
