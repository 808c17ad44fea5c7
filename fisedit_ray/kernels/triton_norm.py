"""Triton: gather + int8 decode + group-norm scale/shift + SiLU, one pass (see `group_norm`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_norm_act(
    x_ptr, rows_ptr, x_scale_ptr, scale_ptr, shift_ptr, out_ptr, L, N, C,
    HAS_ROWS: tl.constexpr, HAS_X_SCALE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_m, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask, c_mask = offs_m < N, offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    src = offs_m
    if HAS_ROWS:
        src = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    x = tl.load(x_ptr + (b * L + src)[:, None] * C + offs_c[None, :], mask=mask, other=0).to(tl.float32)
    if HAS_X_SCALE:
        x = x * tl.load(x_scale_ptr + b * L + src, mask=m_mask, other=0).to(tl.float32)[:, None]
    scale = tl.load(scale_ptr + b * C + offs_c, mask=c_mask, other=0).to(tl.float32)
    shift = tl.load(shift_ptr + b * C + offs_c, mask=c_mask, other=0).to(tl.float32)
    y = x * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    out = out_ptr + (b * N + offs_m)[:, None] * C + offs_c[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def gather_norm_act_triton(x, rows, scale, shift, silu, x_scale=None, dtype=None) -> torch.Tensor:
    b, length, c = x.shape
    n = length if rows is None else len(rows)
    out = torch.empty(b, n, c, device=x.device, dtype=dtype or x.dtype)
    if n == 0:
        return out
    block_m, block_c = 32, min(128, triton.next_power_of_2(c))
    grid = (triton.cdiv(n, block_m), triton.cdiv(c, block_c), b)
    _gather_norm_act[grid](
        x.contiguous(), rows, None if x_scale is None else x_scale.contiguous(),
        scale.contiguous(), shift.contiguous(), out, length, n, c,
        HAS_ROWS=rows is not None, HAS_X_SCALE=x_scale is not None, SILU=silu,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )  # fmt: skip
    return out
