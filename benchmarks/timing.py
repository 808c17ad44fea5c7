"""The one timer the benchmarks share: warm-ups, then the median of several timed runs."""

from __future__ import annotations

import statistics
import time

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
