"""Attention for active query tokens over a full set of keys and values."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def active_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`q` `[B, N, C]` (active tokens), `k`/`v` `[B, L, C]` (all tokens) -> `[B, N, C]`.

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
