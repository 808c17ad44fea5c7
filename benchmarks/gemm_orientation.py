"""Which way to turn a dense layer's GEMM over few rows, on this CPU (`kernels.linear`).

For the weight shapes of a Stable Diffusion 1.5 U-Net's deep levels (3x3 convs as patch GEMMs,
feed-forward and attention projections) and a range of row counts (the active cells of a sparse
step), times `F.linear(x, W)` (`x @ W^T`, what PyTorch runs) against `W @ x^T` turned back, with
warm-ups and the median of --repeats. `kernels.linear.FEW_ROWS` is read off this table. JSON out.

    python benchmarks/gemm_orientation.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(11520, 1280), (23040, 1280), (1280, 10240), (5120, 1280), (5760, 640), (1280, 1280), (2880, 320)]
ROWS = [2, 8, 14, 24, 32, 42, 64, 128]


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("results/gemm_orientation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_out = []
    print(f"{'K x N':>14}" + "".join(f"{m:>8}" for m in ROWS) + "   (x @ W^T time / turned time)")
    for k, n in SHAPES:
        weight, bias = torch.randn(n, k), torch.randn(n)
        ratios = []
        for m in ROWS:
            x = torch.randn(m, k)
            plain = median_ms(lambda x=x, w=weight, b=bias: F.linear(x, w, b), args.repeats)
            turned = median_ms(
                lambda x=x, w=weight, b=bias: torch.addmm(b[:, None], w, x.t()).t(), args.repeats
            )
            rows_out.append({"k": k, "n": n, "rows": m, "plain_ms": plain, "turned_ms": turned})
            ratios.append(plain / turned)
        print(f"{f'{k} x {n}':>14}" + "".join(f"{r:8.2f}" for r in ratios), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
