"""Quality of a scenes model, read by the deterministic detector.

1. Object accuracy: for held-out scenes of 1 to 3 objects, generate from the caption and count the
   objects found with the right colour and shape in the right cell (and the extra objects found).
2. What dense regeneration breaks: for edit pairs, regenerate the edited caption from the same seed
   and measure how much the cells the edit should not touch changed (the problem fisedit-ray solves).

Writes Parquet tables and a PNG grid of examples.

    python benchmarks/quality.py --model scenes --captions 200 --pairs 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import track

from fisedit_ray import EditEngine
from fisedit_ray.detector import detect
from fisedit_ray.figures import labeled_grid
from fisedit_ray.scenes import EDIT_KINDS, cell_window, random_edit, random_scene

HELD_OUT_SEED = 10**9  # training draws its scenes from a seeded stream of 62-bit seeds; these are apart


def object_accuracy(engine: EditEngine, count: int, steps: int, guidance: float) -> tuple[list[dict], list]:
    rows, examples = [], []
    for i in track(range(count), description="object accuracy", transient=True):
        scene = random_scene(HELD_OUT_SEED + i, min_objects=1, max_objects=3)
        image = engine.generate(
            scene.caption, seed=i, num_inference_steps=steps, guidance_scale=guidance
        ).image
        found = detect(image)
        truth = {o.cell: (o.color, o.shape) for o in scene.objects}
        right = sum(found.cell(c) == t for c, t in truth.items())
        rows.append(
            {
                "caption": scene.caption,
                "objects": len(truth),
                "correct": right,
                "accuracy": right / len(truth),
                "extra_objects": len(set(found.objects) - set(truth)),
                "background_ok": found.background == scene.background,
            }
        )
        if len(examples) < 12:
            examples.append((image, scene.caption))
    return rows, examples


def regeneration_damage(engine: EditEngine, count: int, steps: int, guidance: float) -> list[dict]:
    rows = []
    for i in track(range(count), description="regeneration damage", transient=True):
        kind = [k for k in EDIT_KINDS if k != "background"][i % (len(EDIT_KINDS) - 1)]
        scene = random_scene(HELD_OUT_SEED + 10**6 + i, min_objects=1, max_objects=3)
        try:
            pair = random_edit(scene, kind, seed=i)
        except ValueError:
            continue
        before = engine.generate(
            pair.before.caption, seed=i, num_inference_steps=steps, guidance_scale=guidance
        )
        after = engine.generate(
            pair.after.caption, seed=i, num_inference_steps=steps, guidance_scale=guidance
        )
        a, b = np.asarray(before.image).astype(float), np.asarray(after.image).astype(float)
        untouched = [c for c in range(9) if c not in pair.changed_cells]
        diffs, flips = [], 0
        da, db = detect(before.image), detect(after.image)
        for c in untouched:
            window = cell_window(c)
            diffs.append(np.abs(a[window] - b[window]).mean())
            flips += da.cell(c) != db.cell(c)
        target = pair.changed_cells[-1]
        expected = pair.after.object_at(target)
        success = db.cell(target) == ((expected.color, expected.shape) if expected else None)
        rows.append(
            {
                "kind": kind,
                "caption_before": pair.before.caption,
                "caption_after": pair.after.caption,
                "untouched_mean_abs_pixel_diff": float(np.mean(diffs)),
                "untouched_cells_changed_detection": flips / len(untouched),
                "edit_success": success,
            }
        )
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="scenes")
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/quality"))
    args = parser.parse_args()
    engine = EditEngine.from_pretrained(args.model, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, examples = object_accuracy(engine, args.captions, args.steps, args.guidance)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, args.out / "object_accuracy.parquet")
    labeled_grid(examples, columns=4).save(args.out / "examples.png")
    objects = sum(r["objects"] for r in rows)
    total = sum(r["correct"] for r in rows) / objects
    print(f"object accuracy {total:.1%} over {objects} objects (guidance {args.guidance})")
    for n in (1, 2, 3):
        sub = [r for r in rows if r["objects"] == n]
        if sub:
            acc = sum(r["correct"] for r in sub) / sum(r["objects"] for r in sub)
            print(f"  {n} object(s): {acc:.1%} of {len(sub)} captions")
    print(f"  extra objects per image: {np.mean([r['extra_objects'] for r in rows]):.3f}")
    print(f"  background right: {np.mean([r['background_ok'] for r in rows]):.1%}")
    if args.pairs:
        damage = regeneration_damage(engine, args.pairs, args.steps, args.guidance)
        pq.write_table(pa.Table.from_pylist(damage), args.out / "regeneration_damage.parquet")
        print(
            f"dense regeneration of {len(damage)} edit pairs: edit success "
            f"{np.mean([d['edit_success'] for d in damage]):.1%}; untouched cells: mean |pixel diff| "
            f"{np.mean([d['untouched_mean_abs_pixel_diff'] for d in damage]):.2f}/255, detection changed in "
            f"{np.mean([d['untouched_cells_changed_detection'] for d in damage]):.1%}"
        )


if __name__ == "__main__":
    main()
