"""Offline batch editing on Ray Data (a local Ray, two CPUs, so two worker processes): versions
equal to the engine's, refusals reported with their reason, resuming without duplicates, and a
worker killed mid-run."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
from service_helpers import mask_png_bytes, png_array  # noqa: E402

from fisedit_ray import EditEngine  # noqa: E402
from fisedit_ray.deployments.batch import INPUT_SCHEMA, run_batch  # noqa: E402
from fisedit_ray.masks import blob_mask  # noqa: E402

PROMPT = "a red circle at the top left"
MASK = blob_mask((16, 16), 0.2, seed=1)


def fisedit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fisedit_ray.cli", *args], capture_output=True, text=True)


def test_the_command_runs_a_job_resumes_it_and_refuses_a_bad_input(tmp_path):
    """First in this file: the command starts a Ray of its own, before the fixture's."""
    pq.write_table(pa.table({"image_id": ["a"], "prompt": [PROMPT]}), tmp_path / "bad.parquet")
    bad = fisedit("batch", str(tmp_path / "bad.parquet"), str(tmp_path / "out"), "--model", "tiny")
    assert bad.returncode == 2 and "lacks the column(s) edits" in bad.stderr
    rows = [{"image_id": f"i{k}", "prompt": PROMPT, "edits": [edit("a blue square", MASK)]} for k in range(2)]
    source = write_input(tmp_path / "in.parquet", rows)
    run = fisedit("batch", source, str(tmp_path / "out"), "--model", "tiny")
    assert (
        run.returncode == 0 and "2 images written (4 versions, 0 refused), 0 already there" in run.stdout
    ), run.stdout + run.stderr
    again = fisedit("batch", source, str(tmp_path / "out"), "--model", "tiny")
    assert "0 images written (0 versions, 0 refused), 2 already there" in again.stdout, (
        again.stdout + again.stderr
    )
    assert len(read(tmp_path / "out", "versions")) == 4


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def edit(prompt, mask=None, mode=None) -> dict:
    return {"prompt": prompt, "mask_png": None if mask is None else mask_png_bytes(mask), "mode": mode}


def write_input(path: Path, rows: list[dict]) -> str:
    full = [{"seed": 0, "steps": 2, "guidance": 7.5, "size": None, "model": None, **row} for row in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=INPUT_SCHEMA), path)
    return str(path)


def read(output: Path, kind: str) -> list[dict]:
    parts = sorted((output / kind).glob("part-*.parquet"))
    return [row for part in parts for row in pq.read_table(part).to_pylist()]


def test_versions_equal_the_engine_and_bad_rows_are_reported(local_ray, tmp_path):
    rows = [
        {
            "image_id": "a",
            "prompt": PROMPT,
            "seed": 1,
            "edits": [edit("a blue square", MASK), edit("a green circle")],
        },
        {"image_id": "b", "prompt": PROMPT, "seed": 2, "edits": [edit("a white square", MASK, "dense")]},
        {"image_id": "empty", "prompt": " ", "edits": [edit("a blue square", MASK)]},
        {"image_id": "other", "prompt": PROMPT, "model": "sd15", "edits": []},
        {
            "image_id": "c",
            "prompt": PROMPT,
            "edits": [edit("a blue square", np.ones((5, 5), bool)), edit("")],
        },
    ]
    source = write_input(tmp_path / "in.parquet", rows)
    summary = run_batch(source, tmp_path / "out", model="tiny")
    assert (summary.images, summary.versions, summary.errors, summary.skipped) == (5, 6, 4, 0)
    versions = {(r["image_id"], r["version"]): r for r in read(tmp_path / "out", "versions")}
    assert sorted(versions) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0)]
    errors = {(r["image_id"], r["version"]): r["reason"] for r in read(tmp_path / "out", "errors")}
    assert errors.keys() == {("empty", 0), ("other", 0), ("c", 1), ("c", 2)}
    assert "prompt is empty" in errors[("empty", 0)] and "unknown model 'sd15'" in errors[("other", 0)]
    assert "expected the latent size" in errors[("c", 1)] and "edit's prompt is empty" in errors[("c", 2)]

    torch.set_num_threads(1)  # as the actors (one CPU each): the same last bits
    engine = EditEngine.from_pretrained("tiny")
    root = engine.generate(PROMPT, seed=1, num_inference_steps=2)
    assert np.array_equal(png_array(versions[("a", 0)]["image_png"]), np.asarray(root.image))
    by_mask = engine.edit(root, "a blue square", mask=MASK)
    captured = engine.edit(root, "a green circle")
    for k, expected in ((1, by_mask), (2, captured)):  # run together in one batched pass: GEMM rounding
        got = png_array(versions[("a", k)]["image_png"]).astype(int)
        assert np.abs(got - np.asarray(expected.image)).max() <= 1
        assert versions[("a", k)]["mask_ratio"] == expected.stats["mask_ratio"]
        assert versions[("a", k)]["parent_version"] == 0
    assert versions[("a", 2)]["mask_source"] == "capture"
    assert versions[("a", 2)]["macs_executed"] == captured.stats["macs_executed"]
    dense = engine.edit(
        engine.generate(PROMPT, seed=2, num_inference_steps=2), "a white square", mode="dense"
    )
    assert np.array_equal(png_array(versions[("b", 1)]["image_png"]), np.asarray(dense.image))


def test_a_rerun_resumes_without_writing_anything_twice(local_ray, tmp_path):
    rows = [
        {"image_id": f"i{k}", "prompt": PROMPT, "seed": k, "edits": [edit("a blue square", MASK)]}
        for k in range(4)
    ]
    source = write_input(tmp_path / "in.parquet", rows)
    first = run_batch(source, tmp_path / "out", model="tiny")
    assert (first.images, first.versions) == (4, 8)
    again = run_batch(source, tmp_path / "out", model="tiny")
    assert (again.images, again.skipped) == (0, 4)
    parts = sorted((tmp_path / "out" / "versions").glob("part-*.parquet"))
    lost = {r["image_id"] for r in pq.read_table(parts[0]).to_pylist()}
    parts[0].unlink()  # as if the first run had stopped before writing it
    resumed = run_batch(source, tmp_path / "out", model="tiny")
    assert resumed.images == len(lost) and resumed.skipped == 4 - len(lost)
    keys = [(r["image_id"], r["version"]) for r in read(tmp_path / "out", "versions")]
    assert sorted(keys) == sorted((f"i{k}", v) for k in range(4) for v in (0, 1))


def _kill_an_editing_worker(stop: threading.Event, killed: list) -> None:
    """SIGKILL the process of Ray Data's editing actor once it has started working."""
    while not stop.is_set() and not killed:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "MapBatches(Edit)" in title:
                time.sleep(1.0)  # mid-run
                os.kill(int(pid), signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.2)


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(local_ray, tmp_path):
    rows = [
        {
            "image_id": f"i{k}",
            "prompt": PROMPT,
            "seed": k,
            "steps": 4,
            "edits": [edit("a blue square", MASK)] * 2,
        }
        for k in range(12)
    ]
    source = write_input(tmp_path / "in.parquet", rows)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_an_editing_worker, args=(stop, killed))
    killer.start()
    try:
        summary = run_batch(source, tmp_path / "out", model="tiny")
    finally:
        stop.set()
        killer.join()
    assert killed, "no editing worker was found to kill"
    keys = [(r["image_id"], r["version"]) for r in read(tmp_path / "out", "versions")]
    assert sorted(keys) == sorted((f"i{k}", v) for k in range(12) for v in (0, 1, 2))
    assert summary.images == 12
