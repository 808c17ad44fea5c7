"""Group norm on active cells with exact statistics of the whole (mixed) map.

Statistics are kept as per-group sums and sums of squares in float64: sums add up, so the mixed map's
statistics are the parent's sums minus the parent's active cells plus the new active cells.
"""

from __future__ import annotations

import torch

from .chunks import row_chunks


def group_sums(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[2, B, G]` float64: per-group sum and sum of squares of `x` `[B, N, C]`."""
    b, n, c = x.shape
    g = x.reshape(b, n, groups, c // groups).to(torch.float64)
    return torch.stack([g.sum(dim=(1, 3)), g.square().sum(dim=(1, 3))])


def cell_sums(x: torch.Tensor, groups: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[B, N, 2G]`: per-cell, per-group sum (first G) and sum of squares (last G) of `x`.

    What a cache keeps (in float32) of a group norm input that is only needed for statistics:
    summing these rows (in float64, `sum_cells`) gives the sums of any set of cells."""
    b, n, c = x.shape
    parts = row_chunks(x, 1, b * c * dtype.itemsize)  # the copy in `dtype` and its squares
    if len(parts) > 1:
        return torch.cat([cell_sums(part, groups, dtype) for part in parts], dim=1)
    g = x.reshape(b, n, groups, c // groups).to(dtype)
    return torch.cat([g.sum(dim=3), g.square().sum(dim=3)], dim=2)


def segment_sums(cells: torch.Tensor, segment: torch.Tensor | None, segments: int) -> torch.Tensor:
    """`[2, B, S, G]` float64 group sums of the cells of each segment, from per-cell sums
    `[B, N, 2G]` (`cell_sums`) and each cell's segment `[N]` (None: all cells, one segment): the
    statistics of several requests' cells in one pass. A cell of segment `S` counts nowhere (a
    padded pass's extra rows)."""
    b, _, g2 = cells.shape
    if segment is None:
        out = cells.to(torch.float64).sum(dim=1, keepdim=True)
    else:
        out = torch.zeros(b, segments + 1, g2, dtype=torch.float64, device=cells.device)
        out = out.index_add_(1, segment, cells.to(torch.float64))[:, :segments]
    return out.reshape(b, segments, 2, g2 // 2).permute(2, 0, 1, 3)


def sum_cells(sums: torch.Tensor) -> torch.Tensor:
    """`[2, B, G]` float64 group sums from per-cell sums `[B, N, 2G]`: all cells, one segment."""
    return segment_sums(sums, None, 1)[:, :, 0].contiguous()


def group_stats(sums: torch.Tensor, count: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and reciprocal standard deviation (biased variance, as `torch.group_norm`)."""
    mean = sums[0] / count
    var = (sums[1] / count - mean.square()).clamp(min=0)
    return mean, torch.rsqrt(var + eps)


def norm_scale_shift(
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    channels: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel `scale`, `shift` `[..., C]` such that `norm(x) = x * scale + shift`, from
    per-group `mean`, `rstd` `[..., G]`."""
    groups = mean.shape[-1]
    scale = rstd.to(dtype).repeat_interleave(channels // groups, dim=-1)
    shift = (-mean * rstd).to(dtype).repeat_interleave(channels // groups, dim=-1)
    if weight is not None:
        scale, shift = scale * weight, shift * weight + bias
    return scale, shift


def gather_norm_act(
    x: torch.Tensor,
    rows: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    silu: bool,
    x_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`x[:, rows] * scale + shift` (+ SiLU) in `dtype`: gather, int8 decode (`x_scale` `[B, L, 1]`),
    normalisation and activation in one pass (one Triton kernel on a GPU)."""
    dtype = dtype or x.dtype
    if x.is_cuda:
        from .triton_norm import gather_norm_act_triton

        return gather_norm_act_triton(x, rows, scale, shift, silu, x_scale, dtype)
    if rows is not None:
        x = x.index_select(1, rows)  # several times faster than `x[:, rows]` on a CPU
        x_scale = None if x_scale is None else x_scale.index_select(1, rows)
    x = x.to(dtype) if x_scale is None else (x.float() * x_scale.float()).to(dtype)
    y = torch.addcmul(shift[:, None, :], x, scale[:, None, :])
    return torch.nn.functional.silu(y) if silu else y


def segment_norm_act(
    x: torch.Tensor, segment: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool
) -> torch.Tensor:
    """`x * scale + shift` (+ SiLU) for rows `x` `[B, N, C]` of several segments, each with its own
    `scale`, `shift` `[B, S, C]`; `segment` `[N]` says whose each row is."""
    if scale.shape[1] == 1:
        return gather_norm_act(x, None, scale[:, 0], shift[:, 0], silu)
    y = torch.addcmul(shift.index_select(1, segment), x, scale.index_select(1, segment))
    return torch.nn.functional.silu(y) if silu else y
