"""Convolution at active output cells: a gathered-patch GEMM over them only (pixel-wise), or a dense
conv over the whole map filled in from the cache (`dense_conv2d`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import GemmWeight, linear


def conv_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight `[Cout, Cin, kh, kw]` as the GEMM matrix `[Cout, kh * kw * Cin]`, taps outermost.

    Gathered patches come out tap-major (`[N, taps, Cin]`); laying the weight out the same way once
    saves transposing every patch matrix (as much data moved as the gather itself)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def gather_rows(active: torch.Tensor, halo: torch.Tensor) -> torch.Tensor:
    """The rows a gather plan's `index` addresses: `cat([active, halo, zero_row])` `[B, N+M+1, C]`."""
    b, _, c = active.shape
    return torch.cat([active, halo.to(active.dtype), active.new_zeros(b, 1, c)], dim=1)


def sparse_conv2d(
    active: torch.Tensor,
    halo: torch.Tensor,
    index: torch.Tensor,
    matrix: GemmWeight,
    bias: torch.Tensor | None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolution outputs at the cells described by `index` (see `gather_plan`).

    `active` `[B, N, Cin]` and `halo` `[B, M, Cin]` are the conv input's values at active and halo
    cells, `matrix` the conv weight as laid out by `conv_matrix` and prepared for the GEMM; returns
    `[B, len(index), Cout]`.
    On a GPU, one Triton implicit-GEMM kernel (`triton_conv`); here, a row gather and one GEMM. The
    gathered patches go into `workspace` if given (grown as needed): a caller that keeps it for all
    the steps of an edit spares the allocator a big block per conv, which glibc returns to the
    system and faults in again (at a 25% mask, 26k to 50k page faults per U-Net step, measured).
    """
    if active.is_cuda:
        from .triton_conv import sparse_conv2d_triton

        return sparse_conv2d_triton(active, halo, index, matrix.weight, bias)
    rows = gather_rows(active, halo)
    b, r, c = rows.shape
    n, taps = index.shape
    # One row gather over the batch-flattened rows: index_select along dim 0 of a 2-D tensor is a
    # plain row copy, several times faster on a CPU than along dim 1 of a 3-D one.
    flat = (index.reshape(1, -1) + r * torch.arange(b, device=index.device)[:, None]).reshape(-1)
    if workspace is None or torch.compiler.is_compiling():  # a compiled step plans its own memory
        patches = rows.reshape(b * r, c).index_select(0, flat)
    else:
        workspace.resize_(0)  # keeps its memory; an out= tensor of another shape would warn
        patches = torch.index_select(rows.reshape(b * r, c), 0, flat, out=workspace)
    patches = patches.reshape(b * n, taps * c)
    out = linear(patches, matrix, bias)
    return out.reshape(b, n, -1)


def dense_conv2d(
    active: torch.Tensor,
    cells: torch.Tensor,
    rest: torch.Tensor,
    rest_cells: torch.Tensor,
    size: tuple[int, int],
    conv: torch.nn.Conv2d,
    out_cells: torch.Tensor,
    upsample_to: tuple[int, int] | None = None,
) -> torch.Tensor:
    """`conv` over the whole input map, outputs at `out_cells` `[B, len(out_cells), Cout]`.

    The map `[B, h*w, Cin]` (`size` = `(h, w)`) is `active` at `cells` and `rest` at `rest_cells`
    (every other cell, from the cache), nearest-upsampled to `upsample_to` if given."""
    (h, w), (b, _, c) = size, active.shape
    full = active.new_empty(b, h * w, c)
    full.index_copy_(1, cells, active)
    if len(rest_cells):
        full.index_copy_(1, rest_cells, rest.to(active.dtype))
    grid = full.view(b, h, w, c).permute(0, 3, 1, 2)
    if upsample_to is not None:
        grid = F.interpolate(grid, size=upsample_to, mode="nearest")
    out = F.conv2d(grid, conv.weight, conv.bias, conv.stride, conv.padding)
    return out.permute(0, 2, 3, 1).reshape(b, -1, out.shape[1]).index_select(1, out_cells)
