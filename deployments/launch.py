"""Start a local Ray and the service on it (`fisedit serve`), and keep it up until interrupted."""

from __future__ import annotations

import time

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
    num_cpus: int | None = None,
) -> None:
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    args = {"model": model, "editor_replicas": editor_replicas, "editor_cpus": editor_cpus}
    if cache_dtype:
        args["cache_dtype"] = cache_dtype
    serve.run(build_app(args), name="fisedit", route_prefix="/")
    print(f"fisedit-ray serving {model!r} at http://{host}:{port}/v1 (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
