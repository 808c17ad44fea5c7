"""Batch editing evaluated on the scenes world, through the Ray Data job (`fisedit batch`).

Held-out scenes of 1 to 3 objects, each with edits of different kinds (add, remove, recolor,
reshape, move, background), prompts only: every mask is found by Target Area Capture. The same input
runs twice through the same pipeline: sparse edits, and dense regeneration of every edit (its
generation stage records no cache). For each edit: success by the detector (the changed cell shows
what the new caption says; for a background edit, the background), damage to the cells the edit must
not touch (mean |pixel difference| from the parent, and cells whose detection changed), and for
sparse edits the mask's recall and IoU against the cells whose rendering changed. Throughput in edits
per hour of each whole job (generations included) and of its editing stage alone.

    python benchmarks/batch_eval.py --images 200 --edits-per-image 5     # 1,000 edit pairs

Writes the input, both outputs, `edits.parquet` (one row per edit and path), `summary.json` and
`batch_eval.png` under `--out`.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image
from rich.progress import Progress

from fisedit_ray import EditEngine
from fisedit_ray.deployments.batch import INPUT_SCHEMA, run_batch
from fisedit_ray.detector import detect
from fisedit_ray.scenes import EDIT_KINDS, cell_window, random_edit, random_scene

HELD_OUT_SEED = 2 * 10**9  # apart from training's scenes and quality.py's


def make_input(engine: EditEngine, images: int, edits_per_image: int, steps: int) -> tuple[pa.Table, dict]:
    """Rows for the job, and each edit's pair by (image id, version); captions the model reads whole."""
    rows, pairs = [], {}
    for i in range(images):
        scene = random_scene(HELD_OUT_SEED + i, min_objects=1, max_objects=3)
        engine.check_prompt(scene.caption)
        edits = []
        for j, kind in enumerate(np.random.default_rng(i).permutation(EDIT_KINDS)):
            if len(edits) == edits_per_image:
                break
            try:
                pair = random_edit(scene, str(kind), seed=i * 10 + j)
                engine.check_prompt(pair.after.caption)
            except ValueError:  # not possible in this scene (no empty cell), or a caption too long
                continue
            edits.append({"prompt": pair.after.caption, "mask_png": None, "mode": None})
            pairs[(f"s{i}", len(edits))] = pair
        row = {"image_id": f"s{i}", "prompt": scene.caption, "seed": i, "steps": steps, "guidance": 7.5}
        rows.append({**row, "size": None, "model": None, "edits": edits})
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), pairs


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)


def _mean(values: list) -> float:
    """The mean, NaN for none (a background edit touches every cell)."""
    return float(np.mean(values)) if values else float("nan")


def score(output: Path, pairs: dict, path: str) -> list[dict]:
    versions = {}
    for part in sorted((output / "versions").glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            versions[(row["image_id"], row["version"])] = row
    rows = []
    for (image_id, k), pair in pairs.items():
        edit, parent = versions[(image_id, k)], versions[(image_id, 0)]
        before, after = _image(parent["image_png"]), _image(edit["image_png"])
        size = before.shape[0]
        found_before, found_after = detect(before.astype(np.uint8)), detect(after.astype(np.uint8))
        if pair.kind == "background":
            success, untouched = found_after.background == pair.after.background, []
        else:
            target = pair.changed_cells[-1]
            expected = pair.after.object_at(target)
            success = found_after.cell(target) == ((expected.color, expected.shape) if expected else None)
            untouched = [c for c in range(9) if c not in pair.changed_cells]
        row = {
            "path": path,
            "image_id": image_id,
            "version": k,
            "kind": pair.kind,
            "success": bool(success),
            "untouched_abs_pixel_diff": _mean(
                [np.abs(before[cell_window(c, size)] - after[cell_window(c, size)]).mean() for c in untouched]
            ),
            "untouched_detection_changed": _mean(
                [found_before.cell(c) != found_after.cell(c) for c in untouched]
            ),
            "mask_ratio": edit["mask_ratio"],
            "seconds": edit["seconds"] / edit["batch_size"],
        }
        if path == "sparse":
            truth = pair.changed_pixels(size)
            mask = _image(edit["mask_png"])[..., 0] > 127
            row["mask_recall"] = float((mask & truth).sum() / max(truth.sum(), 1))
            row["mask_iou"] = float((mask & truth).sum() / max((mask | truth).sum(), 1))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="scenes")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--edits-per-image", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--editors", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/batch_eval"))
    parser.add_argument("--report", action="store_true", help="Only print the table of a finished run.")
    args = parser.parse_args()
    if args.report:
        print(kind_table(pq.read_table(args.out / "edits.parquet").to_pylist()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    table, pairs = make_input(
        EditEngine.from_pretrained(args.model), args.images, args.edits_per_image, args.steps
    )
    pq.write_table(table, args.out / "input.parquet")
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary, rows = {"edits": len(pairs), "images": args.images}, []
    for path, mode in (("sparse", None), ("dense", "dense")):
        output = args.out / path
        with Progress(transient=True) as bar:
            task = bar.add_task(f"{path} images", total=None)
            job = run_batch(
                str(args.out / "input.parquet"),
                output,
                model=args.model,
                mode=mode,
                generators=args.generators,
                editors=args.editors,
                progress=lambda done, total, task=task: bar.update(task, completed=done, total=total),
            )
        if job.skipped:
            raise SystemExit(f"{output} holds an earlier run: remove it to time this one")
        scored = score(output, pairs, path)
        rows += scored
        edit_seconds = sum(r["seconds"] for r in scored)
        summary[path] = {
            "job_seconds": job.seconds,
            "edits_per_hour": 3600 * len(pairs) / job.seconds,
            "edit_stage_edits_per_hour": 3600 * len(pairs) / edit_seconds,
            "success": float(np.mean([r["success"] for r in scored])),
            "untouched_abs_pixel_diff": float(np.nanmean([r["untouched_abs_pixel_diff"] for r in scored])),
            "untouched_detection_changed": float(
                np.nanmean([r["untouched_detection_changed"] for r in scored])
            ),
            "errors": job.errors,
        }
        if path == "sparse":
            summary[path] |= {
                "mask_recall": float(np.mean([r["mask_recall"] for r in scored])),
                "mask_iou": float(np.mean([r["mask_iou"] for r in scored])),
                "mask_ratio": float(np.mean([r["mask_ratio"] for r in scored])),
            }
        print(path, json.dumps(summary[path], indent=1), flush=True)
    summary["throughput_ratio"] = summary["sparse"]["edits_per_hour"] / summary["dense"]["edits_per_hour"]
    summary["edit_stage_ratio"] = (
        summary["sparse"]["edit_stage_edits_per_hour"] / summary["dense"]["edit_stage_edits_per_hour"]
    )
    pq.write_table(pa.Table.from_pylist(rows), args.out / "edits.parquet")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(rows, summary, args.out / "batch_eval.png")
    print(kind_table(rows))
    print(
        f"throughput: sparse {summary['throughput_ratio']:.2f}x dense "
        f"(edit stage {summary['edit_stage_ratio']:.2f}x)"
    )


def _cell_mean(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None and not np.isnan(r[key])]
    return format(np.mean(values), fmt) if values else "-"


def kind_table(rows: list[dict]) -> str:
    """Per kind of edit, sparse / dense: a Markdown table."""
    lines = [
        "| kind | edits | success | untouched cells: mean abs pixel diff | detection changed there "
        "| mask ratio | mask recall | mask IoU | s per edit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in (*EDIT_KINDS, "all"):
        sparse, dense = (
            [r for r in rows if r["path"] == p and kind in (r["kind"], "all")] for p in ("sparse", "dense")
        )
        cells = [kind, str(len(sparse))]
        for key, fmt in (
            ("success", ".1%"),
            ("untouched_abs_pixel_diff", ".2f"),
            ("untouched_detection_changed", ".1%"),
        ):
            cells.append(f"{_cell_mean(sparse, key, fmt)} / {_cell_mean(dense, key, fmt)}")
        cells += [_cell_mean(sparse, key, ".3f") for key in ("mask_ratio", "mask_recall", "mask_iou")]
        cells.append(f"{_cell_mean(sparse, 'seconds', '.2f')} / {_cell_mean(dense, 'seconds', '.2f')}")
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(len(EDIT_KINDS))
    for offset, name in ((-0.2, "sparse"), (0.2, "dense")):
        by_kind = [[r for r in rows if r["path"] == name and r["kind"] == k] for k in EDIT_KINDS]
        axes[0].bar(
            x + offset, [np.mean([r["success"] for r in rs]) if rs else 0 for rs in by_kind], 0.4, label=name
        )
        damage = [np.nanmean([r["untouched_abs_pixel_diff"] for r in rs]) if rs else 0 for rs in by_kind]
        axes[1].bar(x + offset, np.nan_to_num(damage), 0.4, label=name)
    for ax, title in ((axes[0], "edit success (detector)"), (axes[1], "untouched cells: mean |pixel diff|")):
        ax.set_xticks(x, EDIT_KINDS, rotation=30)
        ax.set_title(title)
        ax.legend()
    paths = ["sparse", "dense"]
    axes[2].bar(paths, [summary[p]["edits_per_hour"] for p in paths])
    axes[2].set_title(f"edits per hour (whole job): {summary['throughput_ratio']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
