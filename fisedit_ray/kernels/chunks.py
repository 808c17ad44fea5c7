"""Row chunks that keep a pass's big temporaries in memory the allocator reuses.

glibc's malloc serves a block of 32 MiB or more (its largest mmap threshold) with a fresh mapping and
unmaps it when it is freed, so a temporary that big is faulted in again, page by page, at every step.
A batched pass over big masks makes such temporaries (a GEGLU's hidden rows, the float64 copies behind
group-norm sums): four edits at 25% of an SD 1.5 step faulted in 0.3-0.5 million pages per pass, 2.3
to 2.7 s of system time in a 10-11.5 s pass. Made in row chunks they stay on the heap. On a GPU the
caching allocator keeps freed blocks: tensors there are never split.
"""

from __future__ import annotations

import torch

# half of glibc's threshold: it also returns the heap's free top to the system beyond twice the
# threshold, which a chunk just under 32 MiB and the next one's temporaries reach (four edits at 25%:
# 71k faults per pass with 30 MiB chunks, 29-38k with 16 MiB)
TEMPORARY_BYTES = 16 << 20


def row_chunks(x: torch.Tensor, dim: int, bytes_per_row: int) -> tuple[torch.Tensor, ...]:
    """`x` split along `dim` into chunks whose temporaries, `bytes_per_row` for each row, stay within
    `TEMPORARY_BYTES`: `(x,)` itself when they already do, or when `x` is not in host memory."""
    rows = max(1, TEMPORARY_BYTES // bytes_per_row)
    return (x,) if x.shape[dim] <= rows or x.device.type != "cpu" else x.split(rows, dim)
