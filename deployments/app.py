"""The application builder: `serve run fisedit_ray.deployments.app:build_app model=scenes`, or the
`import_path` of a Serve config file (see `deployments/configs/`)."""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from fisedit_ray.deployments.cache_owner import CacheOwner
from fisedit_ray.deployments.editor import Editor
from fisedit_ray.deployments.ingress import Ingress
from fisedit_ray.deployments.masker import MaskGenerator

SESSION_ROUTER = "fisedit_ray.deployments.routing:SessionRouter"


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
    default none: eager)."""
    args = dict(args or {})
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
        health_check_period_s=10,
    ).bind(
        model=args.get("model", "scenes"),
        cache_dtype=args.get("cache_dtype"),
        cache_device=args.get("editor_cache_device"),
        threads=max(1, int(cpus)),
        hot_bytes=float(args.get("editor_hot_gib", 4)) * 2**30,
        owner=CacheOwner.bind() if _flag(args.get("store_caches", True)) else None,
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
        health_check_period_s=10,
    ).bind(model=args.get("model", "scenes"), threads=max(1, int(masker_cpus)))
    return Ingress.options(
        ray_actor_options={"num_cpus": float(args.get("ingress_cpus", 0))},
        max_ongoing_requests=int(args.get("max_ongoing_requests", 32)),
        max_queued_requests=int(args.get("max_queued_requests", 64)),
    ).bind(editor, masker)


def _flag(value) -> bool:
    return str(value).lower() not in ("false", "0", "no")
