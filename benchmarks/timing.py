"""The timers the benchmarks share: warm-ups, then the median of several timed runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable

import torch


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()  # a GPU runs asynchronously: time the work, not its launch
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    fns: dict[Hashable, Callable[[], object]], repeats: int, warmup: int = 1, settle: int = 1
) -> dict[Hashable, list[float]]:
    """Every run's seconds of each of `fns`, timed in rounds (one timed run of each per round, in
    order) after `warmup` rounds: on a shared machine whose speed drifts, a slow period slows the runs
    of one round alike, so ratios taken within a round (`round_ratios`) hardly move with it. Each
    timed run follows `settle` untimed runs of the same function, so that it starts from the state
    its own kind leaves (caches, allocator), as in a loop of it, not from the one the previous
    function left (a sparse step right after a dense one ran up to 16% slower, measured)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def round_ratios(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of `numerator[r] / denominator[r]` (see `interleaved_seconds`)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
