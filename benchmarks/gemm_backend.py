"""Which GEMM a dense layer should run on this CPU (`kernels.linear`): plain or packed.

For the weight shapes of a Stable Diffusion 1.5 U-Net (3x3 convs as patch GEMMs, feed-forward and
attention projections, from the deep levels' big weights down to the first level's small ones) and
row counts from a 1.6% mask's few active cells to a 25% mask's thousands, times PyTorch's
`F.linear(x, W)` against oneDNN's GEMM over the weight packed once (`kernels.linear.GemmWeight`), in
float32 and bfloat16, with warm-ups and the median of --repeats. `kernels.linear.PACKED_MIN_WEIGHT`
is read off this table. JSON out.

    python benchmarks/gemm_backend.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_seconds

from fisedit_ray.kernels.linear import GemmWeight, linear, packing_available

SHAPES = [  # (K, N): weight [N, K]
    (23040, 1280),
    (11520, 1280),
    (1280, 10240),
    (5120, 1280),
    (5760, 640),
    (1280, 1280),
    (2880, 320),
    (320, 2560),
    (320, 320),
]
ROWS = [2, 8, 14, 42, 130, 600, 2048]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("results/gemm_backend.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        if not packing_available(dtype):
            print(f"{dtype}: this CPU cannot pack it for oneDNN (bfloat16 needs AVX-512): skipped")
            continue
        print(f"{dtype}: plain time / packed time")
        print(f"{'K x N':>14}" + "".join(f"{m:>8}" for m in ROWS))
        for k, n in SHAPES:
            weight, bias = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
            packed = GemmWeight.pack(weight)
            ratios = []
            for m in ROWS:
                x = torch.randn(m, k).to(dtype)
                plain_ms = 1e3 * median_seconds(
                    lambda x=x, w=weight, b=bias: F.linear(x, w, b), args.repeats, warmup=2
                )
                packed_ms = 1e3 * median_seconds(
                    lambda x=x, w=packed, b=bias: linear(x, w, b), args.repeats, warmup=2
                )
                rows_out.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "k": k,
                        "n": n,
                        "weight_entries": k * n,
                        "rows": m,
                        "plain_ms": plain_ms,
                        "packed_ms": packed_ms,
                    }
                )
                ratios.append(plain_ms / packed_ms)
            print(f"{f'{k} x {n}':>14}" + "".join(f"{r:8.2f}" for r in ratios), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
