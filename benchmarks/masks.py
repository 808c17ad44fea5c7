"""Automatic edit masks (Target Area Capture) on the scenes model, against the ground truth.

For held-out edit pairs of every kind (add, remove, recolor, reshape, move, background): generate the
"before" caption, then edit it to the "after" caption with
- FISEdit's latent difference alone (k = 10 dense steps, Otsu, 2x2 opening: the paper's setting),
- this engine's capture (the default `CaptureConfig`) at k = 1, 2, 3, 5,
- the same with cross-attention weighting (masks only), and with the growth of the earlier default
  (`grow=0.5`: tighter masks) at k = 1,
- dense regeneration from the same seed (the whole image is the mask),
- oracles: the ground-truth changed region itself as the mask, and grown by one latent cell (what
  the best mask at IoU 1, and one at IoU about 0.6, achieve).
Per edit: recall and IoU of the mask against the changed region (latent resolution: a latent cell
changed when any of its pixels did), edit success read by the detector (the changed cells, or the
background, as the after-caption says), and, in the grid cells the edit must not touch, the mean
|pixel difference| to the original, the share of their latents equal to the original's bit for bit,
and the share whose detection changed. Writes Parquet and a plot of quality against k.

    python benchmarks/masks.py --pairs 100 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fisedit_ray import EditEngine
from fisedit_ray.capture import CaptureConfig, dilate
from fisedit_ray.detector import detect
from fisedit_ray.masks import to_latent_mask
from fisedit_ray.scenes import CELLS, EDIT_KINDS, EditPair, cell_window, random_edit, random_scene

PAIR_SEED = 10**9 + 5 * 10**6  # apart from training scenes and from quality.py's captions
FISEDIT = CaptureConfig(dense_steps=10, grow=1.0, opening=2, global_median=None)
KS = (1, 2, 3, 5)


def methods() -> list[tuple[str, CaptureConfig | None, bool]]:
    """(name, capture config or None for dense regeneration, whether the edit is run)."""
    rows = [("latent difference (FISEdit)", FISEDIT, True)]
    rows += [("capture", CaptureConfig(dense_steps=k), True) for k in KS]
    with_attention = [CaptureConfig(dense_steps=k, cross_attention=0.5) for k in KS]
    rows += [("capture + cross-attention", config, False) for config in with_attention]
    rows += [("capture, grow 0.5", CaptureConfig(dense_steps=1, grow=0.5), True)]
    return [*rows, ("dense regeneration", None, True)]


def edit_pairs(per_kind: int) -> list[EditPair]:
    pairs = []
    for k, kind in enumerate(EDIT_KINDS):
        i, found = 0, 0
        while found < per_kind:
            i += 1
            # an added object must not make a fourth: the model was trained on 0-3 objects
            scene = random_scene(PAIR_SEED + 10**5 * k + i, 1, 2 if kind == "add" else 3)
            try:
                pairs.append(random_edit(scene, kind, seed=i))
            except ValueError:
                continue
            found += 1
    return pairs


def oracle_masks(truth: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    return {("ground truth as the mask", 0): truth, ("ground truth + 1 cell", 0): dilate(truth, 1)}


def changed_latents(pair: EditPair, scale: int) -> torch.Tensor:
    pixels = pair.changed_pixels()
    return to_latent_mask(pixels, (pixels.shape[0] // scale, pixels.shape[1] // scale), scale)


def grid_cell_of_latents(size: int, scale: int) -> torch.Tensor:
    """The 3x3 grid cell of every latent cell (by its centre pixel) `[h, w]`."""
    centre = torch.arange(size) * scale + scale // 2
    band = centre * 3 // (size * scale)
    return band[:, None] * 3 + band[None, :]


def succeeded(pair: EditPair, image) -> bool:
    found = detect(image)
    if pair.kind == "background":
        return found.background == pair.after.background
    for cell in pair.changed_cells:
        o = pair.after.object_at(cell)
        if found.cell(cell) != (None if o is None else (o.color, o.shape)):
            return False
    return True


def measure(pair: EditPair, parent, version, mask, engine: EditEngine) -> dict:
    scale = engine.vae_scale
    truth = changed_latents(pair, scale)
    inter = int((mask & truth).sum())
    row = {
        "mask_ratio": float(mask.float().mean()),
        "recall": inter / max(int(truth.sum()), 1),
        "iou": inter / max(int((mask | truth).sum()), 1),
    }
    if version is None:
        return row
    row["edit_success"] = succeeded(pair, version.image)
    untouched = [c for c in range(len(CELLS)) if c not in pair.changed_cells] if pair.changed_cells else []
    if untouched:
        a = np.asarray(parent.image).astype(float)
        b = np.asarray(version.image).astype(float)
        diffs = [np.abs(a[cell_window(c)] - b[cell_window(c)]).mean() for c in untouched]
        cells = grid_cell_of_latents(parent.latents.shape[-1], scale)
        keep = torch.isin(cells, torch.tensor(untouched))
        same = (version.latents[0] == parent.latents[0]).all(0)
        da, db = detect(parent.image), detect(version.image)
        row |= {
            "untouched_pixel_diff": float(np.mean(diffs)),
            "untouched_latents_equal": float(same[keep].float().mean()),
            "untouched_detection_changed": float(np.mean([da.cell(c) != db.cell(c) for c in untouched])),
        }
    return row


def run_pairs(job: tuple[list[tuple[int, EditPair]], str, int, int]) -> list[dict]:
    pairs, model, steps, threads = job
    torch.set_num_threads(threads)
    engine = EditEngine.from_pretrained(model)
    rows = []
    for done, (index, pair) in enumerate(pairs):
        if done % 25 == 0:
            print(f"[{time.strftime('%H:%M:%S')}] pair {done} of {len(pairs)} in this worker", flush=True)
        with torch.no_grad():
            parent = engine.generate(pair.before.caption, seed=index, num_inference_steps=steps)
            base = {"pair": index, "kind": pair.kind, "before": pair.before.caption}
            base["after"] = pair.after.caption
            masks = {}
            for name, config, run in methods():
                if config is None:
                    continue
                start = time.perf_counter()
                mask, found = engine.find_mask(parent, pair.after.caption, capture=config)
                masks[(name, config.dense_steps)] = (mask, time.perf_counter() - start, found, run)
            for key, mask in oracle_masks(changed_latents(pair, engine.vae_scale)).items():
                masks[key] = (mask, 0.0, True, True)
            distinct = {}
            for key, (mask, _, _, run) in masks.items():
                if run:
                    distinct.setdefault(mask.numpy().tobytes(), (mask, []))[1].append(key)
            edits = engine.edit_batch([(parent, pair.after.caption, m) for m, _ in distinct.values()])
            edited = {key: v for (_, keys), v in zip(distinct.values(), edits, strict=True) for key in keys}
            for key, (mask, seconds, _, _) in masks.items():
                row = measure(pair, parent, edited.get(key), mask, engine)
                rows.append({**base, "method": key[0], "k": key[1], "capture_seconds": seconds, **row})
            dense = engine.edit(parent, pair.after.caption, mode="dense", record=False)
            row = measure(pair, parent, dense, torch.ones_like(mask), engine)
            rows.append({**base, "method": "dense regeneration", "k": 0, **row})
    return rows


def summarise(table: pa.Table) -> list[dict]:
    rows = table.to_pylist()
    keys = sorted({(r["method"], r["k"]) for r in rows}, key=lambda key: (key[0], key[1]))
    out = []
    for method, k in keys:
        sub = [r for r in rows if r["method"] == method and r["k"] == k]

        def mean(col, rows=sub):
            values = [r[col] for r in rows if r.get(col) is not None]
            return float(np.mean(values)) if values else float("nan")

        line = {"method": method, "k": k, "pairs": len(sub)}
        for col in ("recall", "iou", "mask_ratio", "edit_success", "untouched_pixel_diff"):
            line[col] = mean(col)
        line["untouched_latents_equal"] = mean("untouched_latents_equal")
        line["untouched_detection_changed"] = mean("untouched_detection_changed")
        for kind in EDIT_KINDS:
            per = [r for r in sub if r["kind"] == kind]
            line[f"recall_{kind}"] = mean("recall", per)
            line[f"iou_{kind}"] = mean("iou", per)
            line[f"success_{kind}"] = mean("edit_success", per)
        out.append(line)
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, col, title in zip(
        axes, ("recall", "iou", "edit_success"), ("mask recall", "mask IoU", "edit success"), strict=True
    ):
        for method, style in (("capture", "o-"), ("capture + cross-attention", "s--")):
            pts = [(s["k"], s[col]) for s in summary if s["method"] == method]
            if pts and not np.isnan(pts[0][1]):
                ax.plot(*zip(*pts, strict=True), style, label=method)
        for s in summary:
            if s["method"] == "latent difference (FISEdit)":
                ax.plot([s["k"]], [s[col]], "k^", label="FISEdit latent difference")
            if s["method"] == "dense regeneration":
                ax.axhline(s[col], color="gray", ls=":", label="dense regeneration")
            if s["method"] == "ground truth + 1 cell":
                ax.axhline(s[col], color="green", ls="-.", label="oracle: ground truth + 1 cell")
        ax.set_xlabel("dense steps k before the mask")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="scenes")
    parser.add_argument("--pairs", type=int, default=100, help="edit pairs of each kind")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="processes, one thread each (>1)")
    parser.add_argument("--out", type=Path, default=Path("results/masks"))
    args = parser.parse_args()
    pairs = list(enumerate(edit_pairs(args.pairs)))
    if args.workers > 1:
        jobs = [(pairs[w :: args.workers], args.model, args.steps, 1) for w in range(args.workers)]
        with mp.get_context("spawn").Pool(args.workers) as pool:
            rows = [r for part in pool.map(run_pairs, jobs) for r in part]
    else:
        rows = run_pairs((pairs, args.model, args.steps, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, args.out / "masks.parquet")
    summary = summarise(table)
    pq.write_table(pa.Table.from_pylist(summary), args.out / "summary.parquet")
    plot(summary, args.out / "masks.png")
    print(f"{len(pairs)} edit pairs ({args.pairs} per kind), {args.steps} steps")
    header = ("method", "k", "recall", "IoU", "mask", "success", "px diff", "lat eq")
    print("".join(f"{h:<28}" if i == 0 else f"{h:>9}" for i, h in enumerate(header)))
    for s in summary:
        print(
            f"{s['method']:<28}{s['k']:>9}{s['recall']:9.3f}{s['iou']:9.3f}{s['mask_ratio']:9.1%}"
            f"{s['edit_success']:9.1%}{s['untouched_pixel_diff']:9.2f}{s['untouched_latents_equal']:9.1%}"
        )
    print("per kind (recall / IoU / success):")
    for s in summary:
        cells = "  ".join(
            f"{kind} {s[f'recall_{kind}']:.2f}/{s[f'iou_{kind}']:.2f}/{s[f'success_{kind}']:.0%}"
            for kind in EDIT_KINDS
        )
        print(f"  {s['method']} k={s['k']}: {cells}")


if __name__ == "__main__":
    main()
