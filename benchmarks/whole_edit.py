"""A whole edit against a whole regeneration, end to end: text encoding, every denoising step and
the decode, through `EditEngine` (the "dense" edit mode with `record=False` is the regeneration: the
same steps, seed and settings, the new prompt, no cache recorded or reused). Timed in the same
run: a warm-up, then the median of --repeats; per-phase medians from the engine's own phase timer.

Edits with a user mask (compact blobs of --ratios) run sparse at every step; an edit without one
first runs Target Area Capture (its k dense steps and the mask, `mask` phase), then its sparse steps.
Writes Parquet and a plot.

    python benchmarks/whole_edit.py --model scenes --steps 20 50 --ratios 0.05 0.25
    python benchmarks/whole_edit.py --device cuda --cache-device cpu   # caches in host memory
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fisedit_ray import EditEngine
from fisedit_ray.masks import blob_mask

PROMPT = "a red circle at the top left"
EDIT = "a red circle at the top left and a blue square at the center"


def timed(fn, repeats: int) -> tuple[float, dict[str, float], object]:
    """Median total seconds, median seconds per phase, and the last result."""
    fn()  # warm-up
    results = [fn() for _ in range(repeats)]
    phases = {
        name: statistics.median(r.stats["seconds"][name] for r in results)
        for name in results[0].stats["seconds"]
    }
    return phases["total"], phases, results[-1]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="scenes")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.25])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dtype", default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--cache-device", default=None, help="where caches live (default: --device)")
    parser.add_argument("--out", type=Path, default=Path("results/whole_edit"))
    args = parser.parse_args()
    engine = EditEngine.from_pretrained(
        args.model, device=args.device, cache_dtype=args.cache_dtype, cache_device=args.cache_device
    )
    rows = []
    for steps in args.steps:
        parent = engine.generate(PROMPT, seed=2, num_inference_steps=steps)
        latent = parent.latents.shape[-2:]
        everywhere = torch.ones(*latent, dtype=torch.bool)
        # a plain regeneration: dense, recording no cache (what a service without fisedit-ray runs)
        regenerate = partial(engine.edit, parent, EDIT, mask=everywhere, mode="dense", record=False)
        dense_s, dense_phases, dense = timed(regenerate, args.repeats)
        masks = {f"user mask {ratio:.0%}": blob_mask(tuple(latent), ratio, seed=0) for ratio in args.ratios}
        masks["automatic mask (capture, k = 1)"] = None
        for source, mask in masks.items():
            edit = partial(engine.edit, parent, EDIT, mask=mask)
            sparse_s, sparse_phases, sparse = timed(edit, args.repeats)
            rows.append(
                {
                    "model": args.model,
                    "device": str(engine.device),
                    "cache_device": str(engine.cache_device or engine.device),
                    "steps": steps,
                    "mask": source,
                    "mask_ratio": sparse.stats["mask_ratio"],
                    "regeneration_s": dense_s,
                    "edit_s": sparse_s,
                    "speedup": dense_s / sparse_s,
                    "edit_mask_s": sparse_phases.get("mask", 0.0),
                    "edit_sparse_steps_s": sparse_phases["sparse_steps"],
                    "edit_decode_s": sparse_phases["decode"],
                    "regeneration_dense_steps_s": dense_phases["dense_steps"],
                    "macs_reduction": dense.stats["macs_executed"] / sparse.stats["macs_executed"],
                    "repeats": args.repeats,
                }
            )
            r = rows[-1]
            print(
                f"{steps:3d} steps  {source:<32} {r['mask_ratio']:6.1%}  regeneration {dense_s:7.3f}s  "
                f"edit {sparse_s:7.3f}s (mask {r['edit_mask_s']:.3f}s)  speed-up {r['speedup']:5.2f}x  "
                f"MACs {r['macs_reduction']:5.1f}x",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out / f"whole_edit_{args.model}.parquet")
    plot(rows, args.out / f"whole_edit_{args.model}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['steps']} steps\n{r['mask']}\n{r['mask_ratio']:.1%} active" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 1, 3.8))
    ax.bar([i - 0.2 for i in x], [r["regeneration_s"] for r in rows], 0.4, label="regeneration")
    ax.bar([i + 0.2 for i in x], [r["edit_s"] for r in rows], 0.4, label="edit")
    for i, r in zip(x, rows, strict=True):
        ax.annotate(f"{r['speedup']:.2f}x", (i + 0.2, r["edit_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("seconds, text to decoded image")
    ax.set_title(f"whole edit vs regeneration, {rows[0]['model']} model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
