"""Serving throughput on loopback: a bounded closed loop of N concurrent users, each generating an
image and then editing it round after round with a ~5% mask (a different blob every edit), against
a local Ray Serve app.

Systems, each started fresh on the same machine:
  dense     every edit is a dense regeneration behind the same API (what a plain Ray Serve Stable
            Diffusion deployment does)
  sparse    sparse edits one at a time (no batching), requests routed to any replica (no session
            affinity): a replica that lacks the parent version fetches it from the object store first
  full      sparse edits, batched, with session affinity (`SessionRouter`: sticky, balanced)
Every user generates, then (once all have) edits: edits per second over the edit phase, which
holds edits only, and p50/p99 edit latency. Parquet plus a plot.

    python benchmarks/serving.py --users 4 --rounds 4
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray import serve

from fisedit_ray.deployments.app import build_app
from fisedit_ray.masks import blob_mask, mask_image

SYSTEMS = {  # the dense baseline is a plain deployment: it records and stores no caches
    "dense": dict(mode="dense", affinity=True, keep_caches=False, batch=1),
    "sparse": dict(mode="sparse", affinity=False, keep_caches=True, batch=1),
    "full": dict(mode="sparse", affinity=True, keep_caches=True, batch=8),
}
PROMPT = "a red circle at the top left"
EDITS = ["a blue square at the center", "a green triangle at the center", "a yellow circle at the center"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mask_b64(latent: int, ratio: float, seed: int) -> str:
    buffer = io.BytesIO()
    mask_image(blob_mask((latent, latent), ratio, seed=seed), 1).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def user(
    base_url: str,
    uid: int,
    rounds: int,
    steps: int,
    mode: str,
    latent: int,
    ratio: float,
    generated: threading.Barrier | None = None,
) -> list[dict]:
    """Generate, wait until every user has (`generated`), edit `rounds` times, delete the session."""
    rows = []
    with httpx.Client(base_url=base_url, timeout=600) as http:
        r = http.post("/v1/sessions", json={"prompt": PROMPT, "seed": uid, "steps": steps})
        r.raise_for_status()
        body = r.json()
        if generated is not None:  # the edit phase holds edits only
            generated.wait()
        auth = {"Authorization": f"Bearer {body['token']}"}
        version = body["version_id"]
        for k in range(rounds):
            url = f"/v1/sessions/{body['session_id']}/versions/{version}/edits"
            mask = mask_b64(latent, ratio, seed=1000 * uid + k)  # a different blob every edit
            start = time.perf_counter()
            r = http.post(
                url, json={"prompt": EDITS[k % len(EDITS)], "mask_png": mask, "mode": mode}, headers=auth
            )
            r.raise_for_status()
            edit = r.json()
            rows.append(
                {
                    "user": uid,
                    "round": k,
                    "start": start,
                    "end": time.perf_counter(),
                    "mask_ratio": edit["stats"]["mask_ratio"],
                    "rebuilt": len(edit["stats"]["rebuilt"]),
                    "fetched": len(edit["stats"]["fetched"]),
                    "replica": edit["stats"]["replica"],
                    "engine_s": edit["stats"]["seconds"]["total"],  # a batch's: shared by its edits
                    "batch_size": edit["stats"].get("batch_size", 1),
                }
            )
            version = edit["version_id"]
        http.delete(f"/v1/sessions/{body['session_id']}", headers=auth).raise_for_status()
    return rows


def run_system(name: str, args) -> dict:
    system = SYSTEMS[name]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args = {
            "model": args.model,
            "editor_replicas": args.replicas,
            "editor_cpus": args.cpus / args.replicas,
            "affinity": system["affinity"],
            "store_caches": system["keep_caches"],
            "keep_caches": system["keep_caches"],
            "editor_max_batch": system["batch"],
        }
        serve.run(build_app(app_args), name="fisedit", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        # warm-up: a session per replica (placement is balanced), enough edits for each engine to
        # learn its edits' MACs (`macs.AffineMacs`) instead of counting them at step 0
        with ThreadPoolExecutor(args.replicas) as pool:
            warm = [
                pool.submit(user, base, 10_000 + u, 8, args.steps, system["mode"], args.latent, args.ratio)
                for u in range(args.replicas)
            ]
            for f in warm:
                f.result()
        generated = threading.Barrier(args.users)
        with ThreadPoolExecutor(args.users) as pool:
            futures = [
                pool.submit(
                    user, base, u, args.rounds, args.steps, system["mode"], args.latent, args.ratio, generated
                )
                for u in range(args.users)
            ]
            rows = [row for f in futures for row in f.result()]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    latencies = sorted(r["end"] - r["start"] for r in rows)
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    return {
        "system": name,
        "users": args.users,
        "rounds": args.rounds,
        "steps": args.steps,
        "mask_ratio": statistics.mean(r["mask_ratio"] for r in rows),
        "edits": len(rows),
        "edits_per_s": len(rows) / span,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "rebuilds_per_edit": statistics.mean(r["rebuilt"] for r in rows),
        "fetches_per_edit": statistics.mean(r["fetched"] for r in rows),
        "engine_s_per_edit": statistics.mean(r["engine_s"] / r["batch_size"] for r in rows),
        "mean_batch_size": statistics.mean(r["batch_size"] for r in rows),
        "busiest_replica_share": max(Counter(r["replica"] for r in rows).values()) / len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="scenes")
    parser.add_argument("--latent", type=int, default=32, help="The model's latent side.")
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=1, help="Runs of every system, alternating; medians.")
    parser.add_argument("--out", type=Path, default=Path("results/serving"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for repeat in range(args.repeats):  # the systems alternate: slow drifts of the machine hit each
        for name in args.systems:
            rows.append({"repeat": repeat, **run_system(name, args)})
            print(report(rows[-1]), flush=True)
        dense = next(
            (r["edits_per_s"] for r in rows if (r["system"], r["repeat"]) == ("dense", repeat)), None
        )
        for r in rows:
            if r["repeat"] == repeat:
                r["x_dense"] = r["edits_per_s"] / dense if dense else None
    summary = [medians([r for r in rows if r["system"] == name]) for name in args.systems]
    if args.repeats > 1:
        print(f"medians of {args.repeats} runs (x dense: median of the same-repeat ratios)")
        for r in summary:
            print(report(r), f" x dense {r['x_dense']:.2f}" if r["x_dense"] else "")
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out / "serving.parquet")
    plot(summary, args.out / "serving.png")


def report(r: dict) -> str:
    return (
        f"{r['system']:7s} {r['edits_per_s']:6.2f} edits/s  p50 {r['p50_s']:6.2f}s  p99 {r['p99_s']:6.2f}s  "
        f"mask {r['mask_ratio']:.1%}  fetches/edit {r['fetches_per_edit']:.2f}  "
        f"rebuilds/edit {r['rebuilds_per_edit']:.2f}  busiest replica {r['busiest_replica_share']:.0%}  "
        f"engine s/edit {r['engine_s_per_edit']:.2f}  batch {r['mean_batch_size']:.1f}"
    )


def medians(runs: list[dict]) -> dict:
    """One system's runs summarised: the median of every measured column."""
    fixed = ("system", "users", "rounds", "steps")
    return {
        k: runs[0][k] if k in fixed or runs[0][k] is None else statistics.median(r[k] for r in runs)
        for k in runs[0]
        if k != "repeat"
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["system"] for r in rows]
    a.bar(names, [r["edits_per_s"] for r in rows])
    a.set_ylabel("edits per second")
    b.bar(names, [r["p50_s"] for r in rows], label="p50")
    b.scatter(names, [r["p99_s"] for r in rows], color="k", label="p99", zorder=3)
    b.set_ylabel("edit latency (s)")
    b.legend()
    fig.suptitle(f"{rows[0]['users']} users, {rows[0]['mask_ratio']:.0%} masks, {rows[0]['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
