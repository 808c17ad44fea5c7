"""A whole edit against a whole regeneration, end to end: text encoding, every denoising step and
the decode. Regenerations, the baselines a user would pick: the model's own diffusers pipeline
called with the new prompt and the same seed and settings, eager and with its U-Net
`torch.compile`d (`--compiled`); and the engine's "dense" edit mode with `record=False` (the same
steps, no cache recorded or reused). Edits: the engine's sparse edit, eager and (`--compiled`) as
compiled step programs (`EditEngine(compile=True)`). Timed in the same run: a warm-up (which
compiles), then the median of --repeats; per-phase medians from the engine's own phase timer;
each compiled row's compile time (its warm-up's) reported apart.

Edits with a user mask (compact blobs of --ratios) run sparse at every step; an edit without one
first runs Target Area Capture (its k dense steps and the mask, `mask` phase), then its sparse steps.
Writes Parquet and a plot.

    python benchmarks/whole_edit.py --model scenes --steps 20 50 --ratios 0.05 0.25 --compiled
    python benchmarks/whole_edit.py --device cuda --cache-device cpu   # caches in host memory
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusionPipeline

from fisedit_ray import EditEngine
from fisedit_ray.masks import blob_mask

PROMPT = "a red circle at the top left"
EDIT = "a red circle at the top left and a blue square at the center"


def timed(fn, repeats: int) -> tuple[float, dict[str, float], object]:
    """Median total seconds, median seconds per phase, and the last result; `phases["compile"]`:
    what the warm-up spent compiling."""
    warm_up = fn()
    results = [fn() for _ in range(repeats)]
    phases = {
        name: statistics.median(r.stats["seconds"][name] for r in results)
        for name in results[0].stats["seconds"]
    }
    phases["compile"] = warm_up.stats.get("compile_seconds", 0.0)
    return phases["total"], phases, results[-1]


def timed_pipeline(pipe: StableDiffusionPipeline, prompt: str, parent, repeats: int) -> tuple[float, float]:
    """Median seconds of a diffusers pipeline call (text to PIL image) with `parent`'s settings,
    and the warm-up's seconds (a compiled U-Net compiles there)."""
    s = parent.settings

    def call():
        start = time.perf_counter()
        pipe(
            prompt,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            negative_prompt=s.negative_prompt,
            generator=torch.Generator("cpu").manual_seed(s.seed),
        )
        return time.perf_counter() - start

    warm_up = call()
    return statistics.median(call() for _ in range(repeats)), warm_up


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
    parser.add_argument("--compiled", action="store_true", help="add the compiled rows (minutes to compile)")
    parser.add_argument("--out", type=Path, default=Path("results/whole_edit"))
    args = parser.parse_args()
    engine = EditEngine.from_pretrained(
        args.model, device=args.device, cache_dtype=args.cache_dtype, cache_device=args.cache_device
    )
    eager_pipe = StableDiffusionPipeline(**engine.pipe.components)
    compiled_pipe = StableDiffusionPipeline(
        **{**engine.pipe.components, "unet": torch.compile(engine.pipe.unet)}
    )
    for pipe in (eager_pipe, compiled_pipe):
        pipe.set_progress_bar_config(disable=True)
    # the compiled edits' engine: the same pipeline, its own sparse U-Net (plain weights)
    compiled_engine = None
    if args.compiled:
        compiled_engine = EditEngine.from_pipeline(
            engine.pipe, cache_dtype=engine.cache_dtype, cache_device=args.cache_device, compile=True
        )
    rows = []
    for steps in args.steps:
        parent = engine.generate(PROMPT, seed=2, num_inference_steps=steps)
        latent = parent.latents.shape[-2:]
        everywhere = torch.ones(*latent, dtype=torch.bool)
        diffusers_s, _ = timed_pipeline(eager_pipe, EDIT, parent, args.repeats)
        compiled_s, compiled_warm_up_s = (
            timed_pipeline(compiled_pipe, EDIT, parent, args.repeats) if args.compiled else (None, None)
        )
        # the engine's dense regeneration, recording no cache (what a service without fisedit-ray runs)
        regenerate = partial(engine.edit, parent, EDIT, mask=everywhere, mode="dense", record=False)
        dense_s, dense_phases, dense = timed(regenerate, args.repeats)
        masks = {f"user mask {ratio:.0%}": blob_mask(tuple(latent), ratio, seed=0) for ratio in args.ratios}
        masks["automatic mask (capture, k = 1)"] = None
        for source, mask in masks.items():
            sparse_s, sparse_phases, sparse = timed(
                partial(engine.edit, parent, EDIT, mask=mask), args.repeats
            )
            edit_compiled_s = edit_compile_s = None
            if compiled_engine is not None:
                edit = partial(compiled_engine.edit, parent, EDIT, mask=mask)
                edit_compiled_s, compiled_phases, _ = timed(edit, args.repeats)
                edit_compile_s = compiled_phases["compile"]
            best_edit_s = min(s for s in (sparse_s, edit_compiled_s) if s is not None)
            rows.append(
                {
                    "model": args.model,
                    "device": str(engine.device),
                    "cache_device": str(engine.cache_device or engine.device),
                    "steps": steps,
                    "mask": source,
                    "mask_ratio": sparse.stats["mask_ratio"],
                    "diffusers_s": diffusers_s,
                    "diffusers_compiled_s": compiled_s,
                    "diffusers_compile_s": compiled_warm_up_s,
                    "regeneration_s": dense_s,
                    "edit_s": sparse_s,
                    "edit_compiled_s": edit_compiled_s,
                    "edit_compile_s": edit_compile_s,
                    "speedup": dense_s / sparse_s,
                    "speedup_vs_diffusers": diffusers_s / best_edit_s,
                    "speedup_vs_compiled_diffusers": None if compiled_s is None else compiled_s / best_edit_s,
                    "edit_mask_s": sparse_phases.get("mask", 0.0),
                    "edit_sparse_steps_s": sparse_phases["sparse_steps"],
                    "edit_decode_s": sparse_phases["decode"],
                    "regeneration_dense_steps_s": dense_phases["dense_steps"],
                    "macs_reduction": dense.stats["macs_executed"] / sparse.stats["macs_executed"],
                    "repeats": args.repeats,
                }
            )
            r = rows[-1]
            compiled = (
                ""
                if compiled_engine is None
                else f"  compiled: diffusers {compiled_s:.3f}s, edit {edit_compiled_s:.3f}s "
                f"(compile {edit_compile_s:.0f}s) -> {r['speedup_vs_compiled_diffusers']:.2f}x"
            )
            print(
                f"{steps:3d} steps  {source:<32} {r['mask_ratio']:6.1%}  diffusers {diffusers_s:.3f}s  "
                f"regeneration {dense_s:.3f}s  edit {sparse_s:.3f}s (mask {r['edit_mask_s']:.3f}s)  "
                f"best edit vs diffusers {r['speedup_vs_diffusers']:.2f}x  MACs {r['macs_reduction']:.1f}x"
                + compiled,
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
    bars = [("diffusers_s", "diffusers, eager"), ("diffusers_compiled_s", "diffusers, compiled")]
    bars += [("edit_s", "edit, eager"), ("edit_compiled_s", "edit, compiled")]
    bars = [(key, label) for key, label in bars if rows[0][key] is not None]
    width = 0.8 / len(bars)
    for k, (key, label) in enumerate(bars):
        offsets = [i - 0.4 + width * (k + 0.5) for i in x]
        ax.bar(offsets, [r[key] for r in rows], width, label=label)
    for i, r in zip(x, rows, strict=True):
        best = min(v for v in (r["edit_s"], r["edit_compiled_s"]) if v is not None)
        ax.annotate(
            f"{r['speedup_vs_diffusers']:.2f}x", (i + 0.3, best), ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("seconds, text to decoded image")
    ax.set_title(f"whole edit vs regeneration, {rows[0]['model']} model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
