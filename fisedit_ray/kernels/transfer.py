"""Rows of a cache kept in one memory, read into another: host memory to a GPU, overlapped.

A GPU engine may keep its versions' caches in host memory (`EditEngine(cache_device="cpu")`): a
GPU then holds many more sessions, and an edit moves only the rows it reads, a fraction of a cache.
The rows are gathered on the host into pinned memory and copied on a side stream; the compute
stream waits for each copy only where it first uses it. The host runs ahead of the GPU (kernel
launches return at once), so the gathers and copies of the next layers and steps proceed while the
GPU computes the current ones. Anywhere else it is a plain gather and copy.
"""

from __future__ import annotations

import torch

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def gather_to(x: torch.Tensor, dim: int, rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """`x.index_select(dim, rows)` (all of `x` for `rows=None`) on `device`."""
    if rows is not None and rows.device != x.device:
        rows = rows.to(x.device)
    if x.device == device or not (x.device.type == "cpu" and device.type == "cuda"):
        picked = x if rows is None else x.index_select(dim, rows)
        return picked.to(device)
    if rows is None and x.is_pinned():  # a cache recorded from a GPU: copied as it is
        staged = x
    else:
        shape = list(x.shape)
        if rows is not None:
            shape[dim] = len(rows)
        staged = torch.empty(shape, dtype=x.dtype, pin_memory=True)
        if rows is None:
            staged.copy_(x)
        else:
            torch.index_select(x, dim, rows, out=staged)
    compute = torch.cuda.current_stream(device)
    stream = _copy_streams.setdefault(device, torch.cuda.Stream(device))
    # the copy need not wait for the compute stream: its destination comes from the side stream's
    # memory pool, and the staging buffer is pinned memory that the copy's event keeps alive
    with torch.cuda.stream(stream):
        out = staged.to(device, non_blocking=True)
    compute.wait_stream(stream)
    out.record_stream(compute)  # the compute stream uses it: not reused before that is done
    return out
