"""Triton: attention of active query tokens over all keys (flash-style online softmax), token-major
`[B, tokens, heads * head_dim]` in and out, so no head transposes are materialised."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula


@triton.jit
def _active_query_attention(
    q_ptr, k_ptr, v_ptr, o_ptr, N, L, H, D, sm_scale,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    C = H * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask, d_mask = offs_m < N, offs_d < D
    q_tile = q_ptr + (b * N + offs_m)[:, None] * C + h * D + offs_d[None, :]
    q = tl.load(q_tile, mask=m_mask[:, None] & d_mask[None, :], other=0)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        k_tile = k_ptr + (b * L + offs_n)[None, :] * C + h * D + offs_d[:, None]
        k = tl.load(k_tile, mask=d_mask[:, None] & n_mask[None, :], other=0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(n_mask[None, :], s * sm_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        p = tl.exp(s - new_max[:, None])
        alpha = tl.exp(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v_tile = v_ptr + (b * L + offs_n)[:, None] * C + h * D + offs_d[None, :]
        v = tl.load(v_tile, mask=n_mask[:, None] & d_mask[None, :], other=0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        row_max = new_max
    out = acc / row_sum[:, None]
    o_tile = o_ptr + (b * N + offs_m)[:, None] * C + h * D + offs_d[None, :]
    tl.store(o_tile, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@torch.library.custom_op("fisedit::active_query_attention", mutates_args=())
def active_query_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> torch.Tensor:
    """A torch operator (so that torch's FLOP counter sees it, `_flops` below) around the kernel."""
    b, n, c = q.shape
    length = k.shape[1]
    d = c // heads
    out = torch.empty_like(q)
    if n == 0:
        return out
    block_m, block_n = 32, 32
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(n, block_m), b * heads)
    _active_query_attention[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), out, n, length, heads, d, d**-0.5,
        IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out


@register_flop_formula(torch.ops.fisedit.active_query_attention)
def _flops(q, k, v, heads, out_shape=None, **kwargs) -> int:
    """2 x (q k^T + p v) over all heads: the count torch gives its own attention kernels."""
    return 4 * q[0] * q[1] * k[1] * q[2]
