"""The application builder: `serve run fisedit_ray.deployments.app:build_app model=scenes`, or the
`import_path` of a Serve config file (see `deployments/configs/`)."""

from __future__ import annotations

import os
from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from fisedit_ray.deployments.cache_owner import CacheOwner
from fisedit_ray.deployments.editor import Editor
from fisedit_ray.deployments.ingress import Ingress
from fisedit_ray.deployments.masker import MaskGenerator

SESSION_ROUTER = "fisedit_ray.deployments.routing:SessionRouter"


def default_data_dir() -> Path:
    """Where the service keeps its database and blobs unless told: `$FISEDIT_DATA`, else
    `~/.local/share/fisedit-ray`."""
    return Path(os.environ.get("FISEDIT_DATA", Path.home() / ".local" / "share" / "fisedit-ray"))


def build_app(args: dict | None = None) -> Application:
    """Arguments (strings from the command line or a config file's `args`): `model` (default
    `scenes`), `cache_dtype`, `editor_replicas` (default 1), `editor_cpus` (CPUs per editor replica,
    default 1), `editor_gpus` (default 0; an editor or mask generator given a GPU runs on it),
    `editor_hot_gib` (cache bytes an editor keeps hot, default 4), `editor_cache_device` (where an
    editor keeps its caches: default its compute device; `cpu` on GPU editors keeps them in host
    memory, holding more sessions per GPU), `max_ongoing_requests` / `max_queued_requests` of the
    ingress (default 32 / 64; a full queue answers 503 with Retry-After), `affinity` (default true;
    false routes each call to any replica, which then fetches what it lacks), `store_caches`
    (default true: every version goes to the object store; false: a miss always rebuilds, as for a
    plain deployment that keeps no caches), `editor_max_batch` (most sparse edits run as one batch,
    default 8; 1 turns batching off), `editor_batch_wait_s` (how long a batch waits for more edits,
    default 0.1), `keep_caches` (default true; false: a plain deployment that
    records no activation caches and serves dense edits only, the serving benchmark's baseline),
    `masker_replicas` / `masker_cpus` / `masker_gpus` (the mask-generation pool, for edits without a
    mask; default 1 / 0 / 0), `editor_compile` (mask ratios, comma-separated, e.g. `0.02,0.05,0.1`:
    editors run sparse steps as compiled programs and compile these before reporting healthy;
    default none: eager).

    State: `data` (a folder for the SQLite database and the blobs, default `default_data_dir()`),
    `database_url` (default `$FISEDIT_DATABASE_URL`, else `sqlite:///<data>/fisedit.db`;
    `postgresql+psycopg://...` on a cluster), `blob_url` (default `<data>/blobs`; any fsspec URL,
    e.g. `s3://bucket/fisedit`), `ingress_replicas` (default 1; any number serve any session).
    Bounds: `cache_store_gib` (the object store's budget for versions, default 4), `cache_idle_s`
    (a session unused this long loses its cached versions, in the object store and on editors;
    default 3600), `max_body_bytes` (413 beyond, default 8 MiB), `session_max_edits` (edits of one
    session run at once per ingress replica; 429 beyond; default 32), `health_check_period_s` (how
    often Serve checks each replica, so how soon it replaces a dead one; default 10)."""
    args = dict(args or {})
    data = Path(args.get("data") or default_data_dir()).expanduser().absolute()
    idle_s = float(args.get("cache_idle_s", 3600))
    health_s = float(args.get("health_check_period_s", 10))  # how soon Serve sees a dead replica
    cpus = float(args.get("editor_cpus", 1))
    max_batch = int(args.get("editor_max_batch", 8))
    affinity = _flag(args.get("affinity", True))
    # strict: a session's calls wait for its home replica, even when it is busy (no fallback); on a
    # busy machine a fallback replica fetches or rebuilds the session's versions and splits its batches
    strict = {"num_fallback_replicas": 0}
    router = (
        RequestRouterConfig(request_router_class=SESSION_ROUTER, request_router_kwargs=strict)
        if affinity
        else RequestRouterConfig()
    )
    owner = CacheOwner.options(health_check_period_s=health_s).bind(
        float(args.get("cache_store_gib", 4)) * 2**30, idle_s
    )
    editor = serve.deployment(
        Editor,
        num_replicas=int(args.get("editor_replicas", 1)),
        ray_actor_options={
            "num_cpus": cpus,
            "num_gpus": float(args.get("editor_gpus", 0)),
        },
        # a batch's worth running and the next batch's waiting in the replica: a session's calls
        # beyond that wait in the ingress's router for their home, retried with growing back-off,
        # and would reach it too spread out to run together
        max_ongoing_requests=2 * max(max_batch, 4),
        request_router_config=router,
        health_check_period_s=health_s,
    ).bind(
        model=args.get("model", "scenes"),
        cache_dtype=args.get("cache_dtype"),
        cache_device=args.get("editor_cache_device"),
        threads=max(1, int(cpus)),
        hot_bytes=float(args.get("editor_hot_gib", 4)) * 2**30,
        idle_s=idle_s,
        owner=owner if _flag(args.get("store_caches", True)) else None,
        max_batch_size=max_batch,
        batch_wait_s=float(args.get("editor_batch_wait_s", 0.1)),
        keep_caches=_flag(args.get("keep_caches", True)),
        compile_ratios=tuple(float(r) for r in str(args.get("editor_compile", "")).split(",") if r.strip()),
    )
    masker_cpus = float(args.get("masker_cpus", 0))
    masker = serve.deployment(
        MaskGenerator,
        num_replicas=int(args.get("masker_replicas", 1)),
        ray_actor_options={"num_cpus": masker_cpus, "num_gpus": float(args.get("masker_gpus", 0))},
        max_ongoing_requests=8,
        health_check_period_s=health_s,
    ).bind(model=args.get("model", "scenes"), threads=max(1, int(masker_cpus)))
    return Ingress.options(
        num_replicas=int(args.get("ingress_replicas", 1)),
        health_check_period_s=health_s,
        ray_actor_options={"num_cpus": float(args.get("ingress_cpus", 0))},
        max_ongoing_requests=int(args.get("max_ongoing_requests", 32)),
        max_queued_requests=int(args.get("max_queued_requests", 64)),
    ).bind(
        editor,
        masker,
        database_url=args.get("database_url")
        or os.environ.get("FISEDIT_DATABASE_URL")
        or f"sqlite:///{data / 'fisedit.db'}",
        blob_url=args.get("blob_url") or str(data / "blobs"),
        max_body_bytes=int(args.get("max_body_bytes", 8 * 2**20)),
        session_max_edits=int(args.get("session_max_edits", 32)),
    )


def _flag(value) -> bool:
    return str(value).lower() not in ("false", "0", "no")
