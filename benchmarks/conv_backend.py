"""Pixel-wise sparse conv against a dense conv over the whole map, per level of an SD 1.5 U-Net: the
measured cost behind the choice of execution per layer (`kernels.conv`, `kernels.linear`).

For a 3x3 conv of each level's shape (batch 2, as under guidance), times the sparse conv over a
compact band of active output cells (gather of the patches and the prepared GEMM, halo included)
against `F.conv2d` over the whole map (what a layer executed densely would run, before keeping its
active outputs), at active fractions from 25% to 100%, with warm-ups and the median of --repeats.
JSON out; prints dense time / sparse time (above 1: pixel-wise is faster).

    python benchmarks/conv_backend.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_seconds

from fisedit_ray.kernels.conv import conv_matrix, sparse_conv2d
from fisedit_ray.kernels.gather import conv_input_positions, gather_plan
from fisedit_ray.kernels.linear import GemmWeight

LEVELS = [(64, 320), (32, 640), (16, 1280), (8, 1280)]  # (side, channels) at 512 px
FRACTIONS = [0.25, 0.5, 0.75, 0.9, 1.0]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("results/conv_backend.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'level':>14}" + "".join(f"{f:>8.0%}" for f in FRACTIONS) + "   (dense time / sparse time)")
    for side, channels in LEVELS:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        weight = GemmWeight.of(conv_matrix(conv.weight.detach()))
        x = torch.randn(2, channels, side, side)
        dense_ms = 1e3 * median_seconds(
            lambda x=x, c=conv: F.conv2d(x, c.weight, c.bias, padding=1), args.repeats, warmup=2
        )
        ratios = []
        for fraction in FRACTIONS:
            n = round(fraction * side * side)
            cells = torch.arange(n)  # a band of whole rows: compact, as masks are
            rank = torch.full((side * side,), -1)
            rank[cells] = torch.arange(n)
            index, halo_cells = gather_plan(conv_input_positions(cells, side, (side, side), 3, 1, 1), rank)
            active, halo = torch.randn(2, n, channels), torch.randn(2, len(halo_cells), channels)
            sparse_ms = 1e3 * median_seconds(
                lambda a=active, h=halo, i=index, w=weight, b=conv.bias: sparse_conv2d(a, h, i, w, b),
                args.repeats,
                warmup=2,
            )
            rows.append(
                {
                    "side": side,
                    "channels": channels,
                    "active_fraction": fraction,
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                }
            )
            ratios.append(dense_ms / sparse_ms)
        print(f"{f'{side}x{side}x{channels}':>14}" + "".join(f"{r:8.2f}" for r in ratios), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
