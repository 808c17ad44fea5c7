"""Dense layers with big weights: the weight packed once for oneDNN's GEMM.

A sparse step multiplies the big weights of the deep levels by a handful of active rows (8 to 42 at a
1.6% mask of a 64x64 latent), where MKL's `x @ W^T` runs far below its speed for many rows.
oneDNN's matmul over a weight packed once in its own blocked layout streams the weight near memory
speed instead. In float32, for weights of a million entries or more: 1.4 to 2.7x faster at 8 to 14
rows, 1.1 to 1.5x at 42 to 130, about even at 600 to 2048, slower only at 2 rows (the timestep
projection); smaller weights lose at few rows. In bfloat16 packing wins at nearly every size
(`benchmarks/gemm_backend.py`, 2 threads). The choice is a fixed rule of the weight's dtype and
size, not timed at run time, so that every process computes the same bits for the same edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# weights of at least this many entries are packed (CPU), by dtype: in bfloat16 every size gains
PACKED_MIN_WEIGHT = {torch.float32: 2**20, torch.bfloat16: 0}
_PACK_ROWS_HINT = 64  # oneDNN lays the weight out for about this many rows; any count works


def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can pack a `dtype` weight on this CPU: bfloat16 needs AVX-512 (BW, VL, DQ) or
    AVX-NE-CONVERT, which not every machine of the same kind has."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass(frozen=True)
class GemmWeight:
    """A weight `[N, K]` as the GEMM reads it: packed for oneDNN, or plain (`weight`)."""

    weight: torch.Tensor | None
    packed: torch.Tensor | None = None

    @classmethod
    def of(cls, weight: torch.Tensor) -> GemmWeight:
        """`weight` packed where the rule says so (then the plain copy is not kept)."""
        weight = weight.detach()
        if (
            weight.device.type == "cpu"
            and weight.dtype in PACKED_MIN_WEIGHT
            and weight.numel() >= PACKED_MIN_WEIGHT[weight.dtype]
            and packing_available(weight.dtype)
        ):
            return cls.pack(weight)
        return cls(weight)

    @classmethod
    def pack(cls, weight: torch.Tensor) -> GemmWeight:
        """`weight` (CPU, float32 or bfloat16) packed, whatever its size."""
        return cls(
            None, torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_ROWS_HINT)
        )


def linear(x: torch.Tensor, weight: GemmWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` for `x` `[..., K]` and `W` as prepared by `GemmWeight.of`."""
    if weight.packed is None:
        return F.linear(x, weight.weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.packed, bias, "none", [], "")
