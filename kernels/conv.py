"""Sparse convolution: a gathered-patch GEMM over the active output cells only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_conv2d(
    active: torch.Tensor,
    halo: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Convolution outputs at the cells described by `index` (see `gather_plan`).

    `active` `[B, N, Cin]` and `halo` `[B, M, Cin]` are the conv input's values at active and halo
    cells, `weight` the conv's own `[Cout, Cin, kh, kw]` (used in place: patches are laid out
    (cin, ky, kx) to match it); returns `[B, len(index), Cout]`.
    """
    b, _, c = active.shape
    n, taps = index.shape
    zero = active.new_zeros(b, 1, c)
    rows = torch.cat([active, halo.to(active.dtype), zero], dim=1)
    patches = rows.index_select(1, index.reshape(-1)).reshape(b, n, taps, c).transpose(2, 3)
    out = F.linear(patches.reshape(b * n, c * taps), weight.reshape(weight.shape[0], -1), bias)
    return out.reshape(b, n, -1)
