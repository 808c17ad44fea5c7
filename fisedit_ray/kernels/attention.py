"""Attention for active query tokens over a full set of keys and values."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_major_keys(device: torch.device) -> bool:
    """Whether `active_query_attention` on `device` reads keys and values fastest head-major (each
    head's rows contiguous, `[B, L, heads, D]` views of `[B, heads, L, D]` memory): PyTorch's fused
    CPU attention does (about a third faster over 4096 keys than through token-major strides); the
    Triton kernel reads token-major maps as they are."""
    return device.type != "cuda"


def active_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`q` `[B, N, C]` (active tokens), `k`/`v` `[B, L, C]` or `[B, L, heads, D]` (all tokens) ->
    `[B, N, C]`.

    On a GPU, one Triton kernel on the token-major maps (`triton_attention`); here, PyTorch's fused
    CPU attention, which runs at about the speed of the GEMMs around it."""
    if q.is_cuda:
        from .triton_attention import active_query_attention_triton

        return active_query_attention_triton(q, k, v, heads)
    b, n, c = q.shape
    d = c // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, heads, d).transpose(1, 2)
    vh = v.reshape(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, n, c)
