"""Triton: sparse convolution as an implicit GEMM over gathered rows (see `conv.sparse_conv2d`).

Each program computes a `BLOCK_M x BLOCK_N` tile of outputs; for every kernel tap it reads the rows
its plan addresses straight from the input rows, so no patch matrix is ever materialised."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from .conv import gather_rows


@triton.jit
def _sparse_conv(
    rows_ptr, index_ptr, w_ptr, bias_ptr, out_ptr, R, N, CIN, COUT, TAPS,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < N, offs_n < COUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, TAPS):
        src = tl.load(index_ptr + offs_m * TAPS + tap, mask=m_mask, other=0)
        row_ptr = rows_ptr + (b * R + src)[:, None] * CIN
        for k0 in range(0, CIN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < CIN
            a = tl.load(row_ptr + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            w_tile = w_ptr + offs_n[None, :] * (TAPS * CIN) + tap * CIN + offs_k[:, None]
            w = tl.load(w_tile, mask=k_mask[:, None] & n_mask[None, :], other=0)
            if IEEE:  # float32 stays float32 (no TF32), as the PyTorch path
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + (b * N + offs_m)[:, None] * COUT + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@torch.library.custom_op("fisedit::sparse_conv2d", mutates_args=())
def sparse_conv2d_triton(
    active: torch.Tensor,
    halo: torch.Tensor,
    index: torch.Tensor,
    matrix: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """A torch operator (so that torch's FLOP counter sees it, `_flops` below) around the kernel."""
    rows = gather_rows(active, halo)
    b, r, cin = rows.shape
    n, taps = index.shape
    cout = matrix.shape[0]
    out = torch.empty(b, n, cout, device=rows.device, dtype=rows.dtype)
    if n == 0:
        return out
    block_m, block_n, block_k = 64, 64, 32
    grid = (triton.cdiv(n, block_m), triton.cdiv(cout, block_n), b)
    _sparse_conv[grid](
        rows, index.contiguous(), matrix.contiguous(), bias, out, r, n, cin, cout, taps,
        HAS_BIAS=bias is not None, IEEE=rows.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


@register_flop_formula(torch.ops.fisedit.sparse_conv2d)
def _flops(active, halo, index, matrix, bias=None, out_shape=None, **kwargs) -> int:
    """2 x (batch x output cells x Cout x taps * Cin): the GEMM the PyTorch path runs."""
    return 2 * active[0] * index[0] * matrix[0] * matrix[1]
