"""Counting the multiply-accumulates that actually run, with torch's FLOP counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels but not the CPU one; same formula.
    b, h, lq, d = query
    lk, dv = key[-2], value[-1]
    return 2 * b * h * lq * lk * (d + dv)


_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def count_macs(fn: Callable[[], T]) -> tuple[T, int]:
    """Run `fn` and return its result and the MACs of the matmuls, convolutions and attention it ran."""
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        result = fn()
    return result, counter.get_total_flops() // 2


class AffineMacs:
    """The MACs of a sparse pass as `c + sum_l a_l * n_l`, `n_l` the active cells of level `l`.

    Exact, not a fit: every operation the counter sees scales with the active cells of its level (GEMM
    rows, attention queries) or is the same for every mask (timestep embedding, the text's keys and
    values). So, per shape (`key`), `levels + 1` counted passes with independent cell counts fix the
    coefficients; one more counted pass must match the prediction before the counter (a slow Python
    dispatch mode) is skipped for that shape. A mismatch disables prediction for the shape."""

    def __init__(self) -> None:
        self.samples: dict[tuple, list[tuple[tuple[int, ...], int]]] = {}
        self.coefficients: dict[tuple, torch.Tensor | None] = {}  # None: not affine, always count
        self.verified: set[tuple] = set()

    def predict(self, key: tuple, counts: tuple[int, ...]) -> int | None:
        if key not in self.verified:
            return None
        return self._evaluate(key, counts)

    def add(self, key: tuple, counts: tuple[int, ...], macs: int) -> None:
        if self.coefficients.get(key, 0) is None:
            return
        if key in self.coefficients:  # solved: this sample verifies it
            if self._evaluate(key, counts) == macs:
                self.verified.add(key)
            else:
                self.coefficients[key] = None
            return
        samples = self.samples.setdefault(key, [])
        samples.append((counts, macs))
        design = torch.tensor([[1, *c] for c, _ in samples], dtype=torch.float64)
        if torch.linalg.matrix_rank(design) < design.shape[1]:
            return
        target = torch.tensor([m for _, m in samples], dtype=torch.float64)
        self.coefficients[key] = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]

    def _evaluate(self, key: tuple, counts: tuple[int, ...]) -> int:
        coefficients = self.coefficients[key]
        return round(
            float(coefficients[0] + (coefficients[1:] * torch.tensor(counts, dtype=torch.float64)).sum())
        )
