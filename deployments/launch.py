"""Start a local Ray and the service on it (`fisedit serve`), and keep it up until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import ray
from ray import serve

from fisedit_ray.deployments.app import build_app


def serve_locally(
    *,
    model: str,
    host: str,
    port: int,
    editor_replicas: int,
    editor_cpus: float,
    cache_dtype: str | None,
    data: Path,
    metrics_port: int,
    num_cpus: int | None = None,
) -> None:
    ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs a handler of its own
    try:
        serve.start(http_options={"host": host, "port": port})
        args = {"model": model, "editor_replicas": editor_replicas, "editor_cpus": editor_cpus, "data": data}
        if cache_dtype:
            args["cache_dtype"] = cache_dtype
        serve.run(build_app(args), name="fisedit", route_prefix="/")
        print(
            f"fisedit-ray serving {model!r}\n"
            f"  web editor: http://{host}:{port}/\n"
            f"  API:        http://{host}:{port}/v1\n"
            f"  metrics:    http://127.0.0.1:{metrics_port}/metrics\n"
            f"  sessions kept in {data} (Ctrl-C stops it)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # stop as Ctrl-C does: Serve, then Ray and every process it started
