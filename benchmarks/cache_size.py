"""Activation cache size per storage format, and what the compact formats do to edits.

1. Bytes per denoising step and per image (``--steps`` steps, plus the trajectory) for Stable
   Diffusion 1.5 at 512 px and 2.1 at 768 px shapes with classifier-free guidance (batch 2). Stored
   bytes depend on shapes only, so the U-Nets run on PyTorch's meta device: the real recording code,
   no weights, no arithmetic.
2. Fidelity on the shipped scenes model: edit pairs with their ground-truth changed cells as masks,
   each edited with every storage format; the difference to the float32 edit in latents and pixels,
   and whether the detector reads the same image.

    python benchmarks/cache_size.py --pairs 24
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import UNet2DConditionModel
from sd_shapes import SD15_UNET, SD21_UNET

from fisedit_ray import EditEngine
from fisedit_ray.cache import ActivationCache, CacheRecorder
from fisedit_ray.detector import detect
from fisedit_ray.scenes import EDIT_KINDS, IMAGE_SIZE, random_edit, random_scene
from fisedit_ray.unet_layout import level_sizes

FORMATS = ("float32", "bfloat16", "int8")
SHAPES = {"SD 1.5, 512 px": (SD15_UNET, 768), "SD 2.1, 768 px": (SD21_UNET, 1024)}


@torch.no_grad()
def step_bytes(config: dict, text_dim: int, storage: str) -> tuple[int, int]:
    """(bytes of one step's activations, bytes of one step's trajectory) with guidance."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        size = (config["sample_size"],) * 2
        cache = ActivationCache(getattr(torch, storage), level_sizes(unet, size))
        recorder = CacheRecorder(unet, cache)
        recorder.begin_step()
        unet(torch.randn(2, 4, *size), torch.tensor(500), encoder_hidden_states=torch.randn(2, 77, text_dim))
        recorder.end_step()
        recorder.remove()
    activations = cache.byte_stats()["per_step"][0]
    trajectory = 2 * 4 * size[0] * size[1] * 4  # latents and guided noise prediction, float32
    return activations, trajectory


def size_rows(steps: int) -> list[dict]:
    rows = []
    for name, (config, text_dim) in SHAPES.items():
        for storage in FORMATS:
            per_step, trajectory = step_bytes(config, text_dim, storage)
            rows.append(
                {
                    "model": name,
                    "storage": storage,
                    "mib_per_step": per_step / 2**20,
                    "mib_per_image": (steps * (per_step + trajectory) + trajectory // 2) / 2**20,
                    "steps": steps,
                }
            )
            print(f"{name:15s} {storage:9s} {rows[-1]['mib_per_step']:8.1f} MiB/step", flush=True)
    return rows


def cells_mask(cells: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    side = IMAGE_SIZE / 3
    for c in cells:
        r, k = divmod(c, 3)
        mask[round(r * side) : round((r + 1) * side), round(k * side) : round((k + 1) * side)] = True
    return mask


@torch.no_grad()
def fidelity_rows(pairs: int, steps: int) -> list[dict]:
    engines = {s: EditEngine.from_pretrained(cache_dtype=s) for s in FORMATS}
    rows = []
    kinds = [k for k in EDIT_KINDS if k != "background"]
    for i in range(pairs):
        pair = random_edit(random_scene(7_000 + i, min_objects=1), kinds[i % len(kinds)], seed=i)
        mask = cells_mask(pair.changed_cells)
        edits = {}
        for storage, engine in engines.items():
            parent = engine.generate(pair.before.caption, seed=i, num_inference_steps=steps)
            edits[storage] = engine.edit(parent, pair.after.caption, mask=mask)
        exact = edits["float32"]
        for storage in FORMATS[1:]:
            edit = edits[storage]
            pixels = np.abs(np.asarray(edit.image, float) - np.asarray(exact.image, float))
            rows.append(
                {
                    "pair": i,
                    "kind": pair.kind,
                    "storage": storage,
                    "max_abs_latent_diff": (edit.latents - exact.latents).abs().max().item(),
                    "mean_abs_pixel_diff": pixels.mean(),
                    "max_abs_pixel_diff": pixels.max(),
                    "same_detection": detect(edit.image) == detect(exact.image),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50, help="Denoising steps per image (sizes).")
    parser.add_argument("--pairs", type=int, default=24, help="Edit pairs for fidelity (0: skip).")
    parser.add_argument("--edit-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results/cache_size"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = size_rows(args.steps)
    pq.write_table(pa.Table.from_pylist(sizes), args.out / "cache_size.parquet")
    plot(sizes, args.out / "cache_size.png")
    summary = {"sizes": sizes}
    if args.pairs:
        fidelity = fidelity_rows(args.pairs, args.edit_steps)
        pq.write_table(pa.Table.from_pylist(fidelity), args.out / "fidelity.parquet")
        summary["fidelity"] = {}
        for storage in FORMATS[1:]:
            sub = [r for r in fidelity if r["storage"] == storage]
            summary["fidelity"][storage] = {
                "pairs": len(sub),
                "max_abs_latent_diff": max(r["max_abs_latent_diff"] for r in sub),
                "mean_abs_pixel_diff": float(np.mean([r["mean_abs_pixel_diff"] for r in sub])),
                "max_abs_pixel_diff": max(r["max_abs_pixel_diff"] for r in sub),
                "same_detection": float(np.mean([r["same_detection"] for r in sub])),
            }
            print(f"{storage}: {summary['fidelity'][storage]}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    width = 0.8 / len(FORMATS)
    for j, storage in enumerate(FORMATS):
        sub = [r for r in rows if r["storage"] == storage]
        x = np.arange(len(sub)) + j * width
        ax.bar(x, [r["mib_per_step"] for r in sub], width, label=storage)
    ax.set_xticks(np.arange(len(SHAPES)) + width * (len(FORMATS) - 1) / 2, list(SHAPES))
    ax.set_ylabel("MiB per denoising step (CFG batch 2)")
    ax.set_title("activation cache per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
