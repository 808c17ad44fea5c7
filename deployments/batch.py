"""Offline batch editing on Ray Data: `fisedit batch INPUT.parquet OUTPUT_DIR`, or `run_batch`.

Each input row is an image and its edits (`INPUT_SCHEMA`). One actor pool generates each image and
records its cache; another runs the edits, a few images at a time, grouped by step count, guidance
and sparsity into batched sparse passes (`EditEngine.edit_batch`). Ray Data streams the rows: an
image's cache travels from the first pool to the second inside its row and is freed once its edits
are done. The driver writes finished images as Parquet parts (`OUTPUT_SCHEMA`, one row per version,
refusals in `errors/`), each part whole or not at all, so a rerun on the same output resumes: images
already written are skipped, none is written twice. Ray retries the work of a worker that dies.
On a cluster the same code runs after `ray.init(address=...)`, each pool where its resources are.
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from fisedit_ray import EditEngine
from fisedit_ray.deployments.cache_owner import png, version_from_payload, version_payload
from fisedit_ray.deployments.editor import add_capture, batch_key, read_mask_png
from fisedit_ray.engine import Version
from fisedit_ray.masks import mask_image, to_latent_mask

EDIT = pa.struct([("prompt", pa.string()), ("mask_png", pa.binary()), ("mode", pa.string())])
INPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # unique per row: the key that resuming goes by
        ("prompt", pa.string()),
        ("seed", pa.int64()),  # optional columns from here: default 0
        ("steps", pa.int64()),  # 20
        ("guidance", pa.float64()),  # 7.5
        ("size", pa.int64()),  # the model's
        ("model", pa.string()),  # the job's; another model is refused
        ("edits", pa.list_(EDIT)),  # mask_png (white = edit): none for automatic capture; mode "sparse"
    ]
)
REQUIRED = ("image_id", "prompt", "edits")
BLOCK_ROWS = 8  # input rows per block handed to the generation pool
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("version", pa.int64()),  # 0: the generation; k: the image's k-th edit
        ("parent_version", pa.int64()),  # edits are of the generation
        ("prompt", pa.string()),
        ("mode", pa.string()),  # generate, sparse, dense
        ("image_png", pa.binary()),
        ("mask_png", pa.binary()),  # the edited region at image size (edits)
        ("mask_ratio", pa.float64()),
        ("mask_source", pa.string()),  # user, capture, full
        ("macs_executed", pa.int64()),  # U-Net MACs, Target Area Capture included
        ("macs_dense", pa.int64()),  # what a dense regeneration runs
        ("seconds", pa.float64()),  # of the (batched) call that made it
        ("batch_size", pa.int64()),  # edits run in one sparse pass with it
    ]
)
ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("version", pa.int64()), ("reason", pa.string())])
# between the pools: an image's rows so far, its generation (pickled payload) and its edits
_STAGE_SCHEMA = pa.schema(
    [
        *OUTPUT_SCHEMA,
        ("reason", pa.string()),  # a refusal (then only image_id and version are set)
        ("expected_rows", pa.int64()),  # 1 + edits: the image is done when all its rows are
        ("parent", pa.binary()),
        ("edits", pa.list_(EDIT)),
    ]
)


@dataclass
class BatchSummary:
    images: int  # written by this run
    versions: int
    errors: int
    skipped: int  # found written by an earlier run
    seconds: float


def _output_row(image_id: str, version: int, expected: int, **values) -> dict:
    return {"image_id": image_id, "version": version, "expected_rows": expected, **values}


def _version_values(version: Version, engine: EditEngine, parent_version: int | None) -> dict:
    stats = version.stats
    mask = None if version.mask is None else png(mask_image(version.mask, engine.vae_scale))
    return {
        "parent_version": parent_version,
        "prompt": version.prompt,
        "mode": version.mode,
        "image_png": png(version.image),
        "mask_png": mask,
        "mask_ratio": stats.get("mask_ratio"),
        "mask_source": stats.get("mask_source"),
        "macs_executed": int(stats["macs_executed"]),
        "macs_dense": int(stats["macs_dense"]),
        "seconds": float(stats["seconds"]["total"]),
        "batch_size": int(stats.get("batch_size", 1)),
    }


class Generate:
    """The generation pool: an image's root version and its cache, handed on in its row."""

    def __init__(self, model: str, threads: int, cache_dtype: str | None, mode: str | None):
        torch.set_num_threads(threads)
        self.model = model
        self.record = mode != "dense"  # regenerations need no cache of their parent
        self.engine = EditEngine.from_pretrained(model, device="auto", cache_dtype=cache_dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            edits = row.get("edits") or []
            image_id, expected = row["image_id"], 1 + len(edits)
            try:
                version = self._generate(row)
            except ValueError as e:  # the whole image is refused, its edits with it
                rows.append(_output_row(image_id, 0, 1, reason=str(e)))
                continue
            values = _version_values(version, self.engine, None)
            # the image goes along: an edit keeps the parent's pixels outside its mask
            parent = pickle.dumps(version_payload(version, values["image_png"]), protocol=5)
            rows.append(_output_row(image_id, 0, expected, **values, parent=parent, edits=edits))
        return pa.Table.from_pylist(rows, schema=_STAGE_SCHEMA)

    def _generate(self, row: dict) -> Version:
        if row.get("model") not in (None, "", self.model):
            raise ValueError(f"unknown model {row['model']!r}: this job runs {self.model!r}")
        if not (row.get("prompt") or "").strip():
            raise ValueError("the prompt is empty")
        size = row.get("size")
        return self.engine.generate(
            row["prompt"],
            seed=_or(row.get("seed"), 0),
            num_inference_steps=_or(row.get("steps"), 20),
            guidance_scale=_or(row.get("guidance"), 7.5),
            height=size,
            width=size,
            record=self.record,
        )


class Edit:
    """The editing pool: the edits of a few images, sparse ones grouped by step count, guidance and
    sparsity into batched passes; the generation's cache is dropped once they are done."""

    def __init__(self, model: str, threads: int, cache_dtype: str | None, mode: str | None):
        torch.set_num_threads(threads)
        self.mode = mode  # overrides every edit's own: "dense" for the regeneration baseline
        self.engine = EditEngine.from_pretrained(model, device="auto", cache_dtype=cache_dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, groups, dense = [], defaultdict(list), []
        for row in batch.to_pylist():
            parent_bytes, edits = row.pop("parent"), row.pop("edits") or []
            rows.append(row)
            if parent_bytes is None:
                continue
            parent = version_from_payload(pickle.loads(parent_bytes), None, self.engine.device)
            for k, edit in enumerate(edits, start=1):
                try:
                    request = self._request(parent, edit)
                except ValueError as e:
                    rows.append(_output_row(row["image_id"], k, row["expected_rows"], reason=str(e)))
                    continue
                if request["mode"] == "dense":
                    dense.append((row, k, request))
                else:
                    groups[batch_key(parent, request["mask"])].append((row, k, request))
        for members in groups.values():
            requests = [(r["parent"], r["prompt"], r["mask"]) for _, _, r in members]
            edited = self.engine.edit_batch(requests, record=False)  # nobody edits them further
            for (row, k, request), version in zip(members, edited, strict=True):
                rows.append(self._row(row, k, request, version))
        for row, k, request in dense:
            parent, prompt, mask = request["parent"], request["prompt"], request["mask"]
            version = self.engine.edit(parent, prompt, mask=mask, mode="dense", record=False)
            rows.append(self._row(row, k, request, version))
        return pa.Table.from_pylist(rows, schema=_STAGE_SCHEMA).drop_columns(["parent", "edits"])

    def _request(self, parent: Version, edit: dict) -> dict:
        prompt, mode = edit.get("prompt") or "", self.mode or edit.get("mode") or "sparse"
        if not prompt.strip():
            raise ValueError("the edit's prompt is empty")
        if mode not in ("sparse", "dense"):
            raise ValueError(f"an edit's mode is sparse or dense, not {mode!r}")
        self.engine.check_prompt(prompt)
        size = self.engine.latent_size(parent.settings)
        found, image = None, read_mask_png(edit.get("mask_png"))
        if image is not None:
            mask = to_latent_mask(image, size, self.engine.vae_scale)
        elif mode == "sparse":  # Target Area Capture, before grouping: the group is by its sparsity
            start = time.perf_counter()
            mask, found = self.engine.find_mask(parent, prompt)
            found["capture_seconds"] = time.perf_counter() - start
        else:
            mask = None  # a dense regeneration of the whole image
        return {"parent": parent, "prompt": prompt, "mask": mask, "mode": mode, "capture": found}

    def _row(self, row: dict, k: int, request: dict, version: Version) -> dict:
        add_capture(version.stats, request["capture"])
        values = _version_values(version, self.engine, 0)
        return _output_row(row["image_id"], k, row["expected_rows"], **values)


def _or(value, default):
    return default if value is None else value


class _PartWriter:
    """Writes the rows of finished images (all their versions and refusals in) as Parquet parts:
    an errors part, then a versions part of the same name, each written to a temporary name and
    renamed. The versions part commits the pair: an errors part without one is left over from a
    run that stopped between the two, and is removed."""

    def __init__(self, output: Path):
        self.versions, self.errors = output / "versions", output / "errors"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.errors.mkdir(parents=True, exist_ok=True)
        for orphan in self.errors.glob("part-*.parquet"):
            if not (self.versions / orphan.name).exists():
                orphan.unlink()
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.images = self.version_rows = self.error_rows = 0

    def add(self, batch: pa.Table) -> int:
        """Buffer `batch`'s rows; write the images it completes. Returns how many it completed."""
        finished = []
        for row in batch.to_pylist():
            rows = self.pending[row["image_id"]]
            rows.append(row)
            if len(rows) == row["expected_rows"]:
                finished.extend(self.pending.pop(row["image_id"]))
        if not finished:
            return 0
        versions = [r for r in finished if r["reason"] is None]
        errors = [r for r in finished if r["reason"] is not None]
        name = f"part-{uuid.uuid4().hex}.parquet"
        if errors:
            _write_part(self.errors / name, errors, ERRORS_SCHEMA)
        _write_part(self.versions / name, versions, OUTPUT_SCHEMA)
        images = len({r["image_id"] for r in finished})
        self.images += images
        self.version_rows += len(versions)
        self.error_rows += len(errors)
        return images


def _write_part(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in rows], schema=schema)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial)
    partial.rename(path)


def written_images(output: Path) -> set[str]:
    """Images an earlier run finished: every image in a committed pair of parts (see `_PartWriter`)."""
    done = set()
    for part in sorted((output / "versions").glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["image_id"])["image_id"].to_pylist())
        errors = output / "errors" / part.name
        if errors.exists():
            done.update(pq.read_table(errors, columns=["image_id"])["image_id"].to_pylist())
    return done


def read_input(path: str) -> pa.Table:
    """The input's rows (prompts and masks: small beside what the job makes), with every column of
    `INPUT_SCHEMA`; refused if a required one is missing."""
    table = pq.read_table(path)
    missing = [name for name in REQUIRED if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: the input lacks the column(s) {', '.join(missing)} (see INPUT_SCHEMA)")
    columns = {}
    for field in INPUT_SCHEMA:
        column = table[field.name] if field.name in table.column_names else pa.nulls(table.num_rows)
        columns[field.name] = column.cast(field.type)
    return pa.table(columns, schema=INPUT_SCHEMA)


def run_batch(
    input_path: str,
    output: str | Path,
    *,
    model: str = "scenes",
    mode: str | None = None,
    generators: int = 1,
    editors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    images_per_edit_call: int = 4,
    cache_dtype: str | None = None,
    progress=None,
) -> BatchSummary:
    """Run the job on the Ray that `ray.init` connected to (a local one if none). `mode="dense"`
    regenerates every edit instead (the baseline). `progress(done, total)` is told of each write."""
    start = time.perf_counter()
    output = Path(output)
    table = read_input(input_path)
    done = written_images(output)
    todo = table.filter(pc.invert(pc.is_in(table["image_id"], value_set=pa.array(sorted(done), pa.string()))))
    threads = max(1, int(cpus_per_actor))
    actor = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor, "batch_format": "pyarrow"}
    engine_args = {"model": model, "threads": threads, "cache_dtype": cache_dtype, "mode": mode}
    # from the driver, in small blocks: no read tasks competing with the actors for CPUs
    ds = ray.data.from_arrow(
        [todo.slice(i, BLOCK_ROWS) for i in range(0, todo.num_rows, BLOCK_ROWS)] or [todo]
    )
    ds = ds.map_batches(
        Generate,
        fn_constructor_kwargs=engine_args,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=generators),
        **actor,
    )
    ds = ds.map_batches(
        Edit,
        fn_constructor_kwargs=engine_args,
        batch_size=images_per_edit_call,
        compute=ray.data.ActorPoolStrategy(size=editors),
        **actor,
    )
    writer = _PartWriter(output)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if writer.add(batch) and progress is not None:
            progress(len(done) + writer.images, table.num_rows)
    seconds = time.perf_counter() - start
    return BatchSummary(writer.images, writer.version_rows, writer.error_rows, len(done), seconds)
