"""Index plans for gathering conv neighbourhoods of active cells."""

from __future__ import annotations

import torch


def conv_input_positions(
    out_cells: torch.Tensor,
    out_width: int,
    in_size: tuple[int, int],
    kernel: int,
    stride: int,
    padding: int,
) -> torch.Tensor:
    """Flat input-grid index of every kernel tap of every output cell, -1 where it falls in padding.

    Returns `[len(out_cells), kernel * kernel]`, taps in row-major (ky, kx) order, as in a conv weight.
    """
    in_h, in_w = in_size
    oy, ox = out_cells // out_width, out_cells % out_width
    k = torch.arange(kernel, device=out_cells.device)
    iy = (oy * stride - padding)[:, None, None] + k[None, :, None]
    ix = (ox * stride - padding)[:, None, None] + k[None, None, :]
    inside = (iy >= 0) & (iy < in_h) & (ix >= 0) & (ix < in_w)
    flat = torch.where(inside, iy * in_w + ix, torch.full_like(iy, -1))
    return flat.reshape(len(out_cells), kernel * kernel)


def gather_plan(
    positions: torch.Tensor, source_rank: torch.Tensor, active_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the source cells a gather reads into active ones and halo ones.

    `positions` holds source-grid cells (-1 for zero padding); `source_rank[cell]` is the cell's row in
    the active values, or -1 if the cell is inactive. Returns `(index, halo_cells)`: `index` addresses
    rows of `cat([active, halo, zero_row])`, `halo_cells` lists the inactive source cells read, whose
    values come from the cache. `active_rows`: how many rows the active values have, if more than
    the active cells (a padded pass, whose extra rows no index reads).
    """
    n_active = int((source_rank >= 0).sum()) if active_rows is None else active_rows
    valid = positions >= 0
    safe = positions.clamp(min=0)
    rank = torch.where(valid, source_rank[safe], torch.full_like(safe, -1))
    is_halo = valid & (rank < 0)
    halo_cells, halo_rank = torch.unique(positions[is_halo], return_inverse=True)
    zero_row = n_active + len(halo_cells)
    index = torch.full_like(positions, zero_row)
    index[valid & ~is_halo] = rank[valid & ~is_halo]
    index[is_halo] = n_active + halo_rank
    return index, halo_cells
