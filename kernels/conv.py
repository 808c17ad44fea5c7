"""Sparse convolution: a gathered-patch GEMM over the active output cells only."""

from __future__ import annotations

import torch
from torch import nn


def conv_weight_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """`[kh * kw * Cin, Cout]`, rows in (ky, kx, cin) order to match `conv_input_positions`."""
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise NotImplementedError(f"sparse conv supports plain convolutions only, got {conv}")
    w = conv.weight
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()


def sparse_conv2d(
    active: torch.Tensor,
    halo: torch.Tensor,
    index: torch.Tensor,
    weight_matrix: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Convolution outputs at the cells described by `index` (see `gather_plan`).

    `active` `[B, N, Cin]` and `halo` `[B, M, Cin]` are the conv input's values at active and halo
    cells; returns `[B, len(index), Cout]`.
    """
    b, _, c = active.shape
    zero = active.new_zeros(b, 1, c)
    rows = torch.cat([active, halo.to(active.dtype), zero], dim=1)
    patches = rows.index_select(1, index.reshape(-1)).reshape(b * index.shape[0], -1)
    if bias is None:
        out = patches @ weight_matrix
    else:
        out = torch.addmm(bias, patches, weight_matrix)
    return out.reshape(b, index.shape[0], -1)
