"""Counting the multiply-accumulates that actually run, with torch's FLOP counter."""

from __future__ import annotations

import math
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


def _packed_linear_flops(x, weight, *args, out_shape=None, **kwargs) -> int:
    # oneDNN's GEMM over a packed weight (`kernels.linear`), unknown to the counter: the weight's
    # packed shape is not [N, K], so count from the input's rows and width and the output's width.
    return 2 * math.prod(x) * out_shape[-1]


_CUSTOM = {}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _CUSTOM[torch.ops.mkldnn._linear_pointwise] = _packed_linear_flops
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
    values). Per shape (`key`), a pass is predicted from the counted ones when its cell counts lie in
    their affine span (masks of one ratio often share the level-0 count: the span is all that can be
    known, and all that is needed) and the counted passes outnumber the span's dimension, so at least
    one of them confirmed the affine form. Otherwise it is counted (a slow Python dispatch mode) and
    added. A counted pass the affine form does not fit disables prediction for the shape."""

    def __init__(self) -> None:
        self.samples: dict[tuple, list[tuple[tuple[int, ...], int]]] = {}
        self.broken: set[tuple] = set()
        self._fits: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}  # design, rank, solution

    def predict(self, key: tuple, counts: tuple[int, ...]) -> int | None:
        if key in self.broken or key not in self._fits:
            return None
        design, rank, solution = self._fits[key]
        row = torch.tensor([[1, *counts]], dtype=torch.float64)
        if len(design) <= rank or torch.linalg.matrix_rank(torch.cat([design, row])) > rank:
            return None
        return round(float((row @ solution)[0]))

    def add(self, key: tuple, counts: tuple[int, ...], macs: int) -> None:
        if key in self.broken:
            return
        samples = self.samples.setdefault(key, [])
        samples.append((counts, macs))
        design = torch.tensor([[1, *c] for c, _ in samples], dtype=torch.float64)
        target = torch.tensor([[m] for _, m in samples], dtype=torch.float64)
        solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
        if (design @ solution - target).abs().max() > 0.5:
            self.broken.add(key)
            self._fits.pop(key, None)
            return
        self._fits[key] = (design, int(torch.linalg.matrix_rank(design)), solution)
