"""Dense layers over few rows, with the GEMM turned so that the weight is the operand streamed.

A sparse step multiplies the big weights of the deep levels by a handful of active rows (8 to 42 at
a 1.6% mask of a 64x64 latent). MKL runs `x @ W^T` with so few rows far below its speed for many
rows; `W @ x^T`, the same product turned around, runs 1.1 to 3x faster for 8 to 63 rows and a
weight of a million entries or more, and slower below 8 rows or for small weights
(`benchmarks/gemm_orientation.py`, 2 threads). The choice is a fixed rule of the shape, not timed at
run time, so that every process computes the same bits for the same edit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TURNED_ROWS = range(8, 64)  # row counts at which `W @ x^T` is faster ...
TURNED_MIN_WEIGHT = 2**20  # ... for weights of at least this many entries


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for `x` `[..., K]`, `weight` `[N, K]`."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda or rows not in TURNED_ROWS or weight.numel() < TURNED_MIN_WEIGHT:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).t()
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
    return out.t().reshape(*x.shape[:-1], weight.shape[0])
