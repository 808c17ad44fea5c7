"""Pixel-wise or dense, per conv layer: the choice a measured cost table makes.

A sparse step can run a k x k conv pixel-wise (the gathered-patch GEMM over its active outputs, the
halo read from the cache, `conv.sparse_conv2d`) or densely (`F.conv2d` over the whole map, its
inactive input cells filled from the cache, the active outputs kept). Both give the same values up
to float rounding; which is faster depends on the layer's shape, its active fraction and the machine.
`benchmarks/conv_backend.py --table` measures both, as the engine runs them, for 3x3 convs of each
Stable Diffusion level at several active fractions, and writes the table shipped beside this file.

A layer is predicted from the measured shape nearest to it (in log cells and log channels; both
options scale alike with its MACs, so the nearest shape's ratio carries over), interpolated linearly
in the active fraction of its output level. A layer more than `REACH` away from every measured shape
in cells or channels (a small model's, whose convs cost their overheads, not their MACs), and a
device and dtype without a table, run pixel-wise. The
choice depends only on the shipped table, the layer's shape and its active cells: every process
makes the same one, so the same edit computes the same bits everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

import torch

TABLE = Path(__file__).with_name("conv_costs.json")
REACH = 2.5  # how far (a factor in cells, and in channels) a measured shape's ratio is carried


@dataclass(frozen=True)
class ConvCosts:
    """Measured seconds of one conv shape per active fraction: `rows` of `(cells, channels, fraction,
    dense_s, sparse_s)`."""

    rows: tuple[tuple[int, int, float, float, float], ...]

    PIXEL_WISE: ClassVar[ConvCosts]  # no measurements: every conv pixel-wise

    @classmethod
    def from_json(cls, table: dict) -> ConvCosts:
        keys = ("cells", "channels", "active_fraction", "dense_s", "sparse_s")
        return cls(tuple(tuple(row[k] for k in keys) for row in table["rows"]))

    def runs_dense(self, cells: int, channels_in: int, channels_out: int, active_fraction: float) -> bool:
        """Whether a conv with an output map of `cells` cells is predicted faster dense."""
        if not self.rows:
            return False
        channels = math.sqrt(channels_in * channels_out)
        shapes = [
            (c, ch)
            for c, ch in {(c, ch) for c, ch, *_ in self.rows}
            if max(c / cells, cells / c, ch / channels, channels / ch) <= REACH
        ]
        if not shapes:
            return False
        nearest = min(shapes, key=lambda s: math.hypot(math.log(s[0] / cells), math.log(s[1] / channels)))
        points = sorted((f, d, s) for c, ch, f, d, s in self.rows if (c, ch) == nearest)
        fractions = [f for f, _, _ in points]
        if active_fraction <= fractions[0]:
            _, dense, sparse = points[0]
        elif active_fraction >= fractions[-1]:
            _, dense, sparse = points[-1]
        else:
            i = next(i for i, f in enumerate(fractions) if f >= active_fraction)
            (f0, d0, s0), (f1, d1, s1) = points[i - 1], points[i]
            w = (active_fraction - f0) / (f1 - f0)
            dense, sparse = d0 + w * (d1 - d0), s0 + w * (s1 - s0)
        return dense < sparse

    @staticmethod
    @cache
    def shipped(device_type: str, dtype: torch.dtype) -> ConvCosts:
        """The shipped table measured on `device_type` in `dtype`, else `PIXEL_WISE`."""
        for table in json.loads(TABLE.read_text())["tables"]:
            if table["device"] == device_type and table["dtype"] == str(dtype).removeprefix("torch."):
                return ConvCosts.from_json(table)
        return ConvCosts.PIXEL_WISE


ConvCosts.PIXEL_WISE = ConvCosts(())
