"""Pixel-wise against dense, per conv layer: the measured table behind the engine's choice
(`fisedit_ray/kernels/conv_cost.py`).

For a 3x3 conv of each level of an SD 1.5 U-Net (batch 2, as under guidance) and a compact band of
active cells at fractions from 25% to 100%, times the two ways a sparse step can run it, as the engine
runs them, from a cached map of the conv's input (its group norm's scale/shift and SiLU applied on
reading, as a conv after a norm reads its parent):
- pixel-wise: read the halo (inactive neighbours of active outputs) from the cache, then the
  gathered-patch GEMM over the active outputs (`sparse_conv2d`);
- dense: read every inactive cell from the cache into the whole map, `F.conv2d` over it, keep the
  active outputs.
Warm-ups and the median of --repeats. JSON out; prints dense time / pixel-wise time (above 1:
pixel-wise is faster). `--table` also writes (or updates) this device's and dtype's entry of the
table the engine ships, `fisedit_ray/kernels/conv_costs.json`.

    python benchmarks/conv_backend.py
    python benchmarks/conv_backend.py --table fisedit_ray/kernels/conv_costs.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import torch
from timing import median_seconds

from fisedit_ray.kernels.conv import conv_matrix, dense_conv2d, sparse_conv2d
from fisedit_ray.kernels.gather import conv_input_positions, gather_plan
from fisedit_ray.kernels.group_norm import gather_norm_act
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
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/conv_backend.json"))
    parser.add_argument("--table", type=Path, help="the engine's cost table to write this entry into")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    print(f"{'level':>14}" + "".join(f"{f:>8.0%}" for f in FRACTIONS) + "   (dense time / pixel-wise time)")
    for side, channels in LEVELS:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype)
        weight = GemmWeight.of(conv_matrix(conv.weight.detach()))
        stored = torch.randn(2, side * side, channels, device=device, dtype=dtype)  # the cached input
        scale, shift = torch.rand(2, channels, device=device, dtype=dtype), torch.randn_like(stored[:, 0])
        ratios = []
        for fraction in FRACTIONS:
            dense_s, sparse_s = time_both(conv, weight, stored, scale, shift, fraction, args.repeats)
            rows.append(
                {
                    "cells": side * side,
                    "channels": channels,
                    "active_fraction": fraction,
                    "dense_s": dense_s,
                    "sparse_s": sparse_s,
                }
            )
            ratios.append(dense_s / sparse_s)
        print(f"{f'{side}x{side}x{channels}':>14}" + "".join(f"{r:8.2f}" for r in ratios), flush=True)
    entry = {
        "device": device.type,
        "dtype": args.dtype,
        "threads": args.threads,
        "measured": datetime.date.today().isoformat(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(entry, indent=1))
    if args.table:
        tables = json.loads(args.table.read_text())["tables"] if args.table.exists() else []
        tables = [t for t in tables if (t["device"], t["dtype"]) != (entry["device"], entry["dtype"])]
        args.table.write_text(json.dumps({"tables": [*tables, entry]}, indent=1) + "\n")


def time_both(
    conv: torch.nn.Conv2d,
    weight: GemmWeight,
    stored: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    fraction: float,
    repeats: int,
) -> tuple[float, float]:
    """Median seconds of the dense and the pixel-wise way over a band of `fraction` active cells."""
    _, cells_total, channels = stored.shape
    side, device, dtype = math.isqrt(cells_total), stored.device, stored.dtype
    n = round(fraction * cells_total)
    cells = torch.arange(n, device=device)  # a band of whole rows: compact, as masks are
    inactive = torch.arange(n, cells_total, device=device)
    rank = torch.full((cells_total,), -1, device=device)
    rank[cells] = torch.arange(n, device=device)
    index, halo_cells = gather_plan(conv_input_positions(cells, side, (side, side), 3, 1, 1), rank)
    active = torch.randn(2, n, channels, device=device, dtype=dtype)

    def pixel_wise() -> torch.Tensor:
        halo = gather_norm_act(stored, halo_cells, scale, shift, True)
        return sparse_conv2d(active, halo, index, weight, conv.bias)

    def dense() -> torch.Tensor:
        rest = gather_norm_act(stored, inactive, scale, shift, True)
        return dense_conv2d(active, cells, rest, inactive, (side, side), conv, cells)

    error = (dense() - pixel_wise()).abs().max().item()
    assert error < (1e-3 if dtype == torch.float32 else 0.5), f"the two ways differ by {error}"
    return median_seconds(dense, repeats, warmup=2), median_seconds(pixel_wise, repeats, warmup=2)


if __name__ == "__main__":
    main()
