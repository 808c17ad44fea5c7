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
