"""Versions in the Ray object store, owned by a long-lived deployment (an object dies with its owner,
so request handlers must not own them). A replica that lacks a version fetches it from here before
it falls back to rebuilding it from the lineage.

The store is bounded: a byte budget (least recently used versions evicted first) and an idle expiry
per session. It is a cache, not a record: if the owner dies, Serve restarts it empty and editors
rebuild what they need from the lineage, bit for bit."""

from __future__ import annotations

import io

import numpy as np
import ray
import torch
from PIL import Image
from ray import serve

from fisedit_ray.cache import ActivationCache
from fisedit_ray.deployments.budget import BoundedLRU
from fisedit_ray.deployments.telemetry import count_evictions
from fisedit_ray.engine import Settings, Version


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def version_payload(version: Version, image_png: bytes | None) -> dict:
    """A version without its parent: metadata, its image as `image_png` (encoded once, by the caller,
    which also sends it back), latents and mask, and its own cache (a delta for an edit), as plain
    values and numpy arrays (which Ray stores without pickling them; the cache is one byte array,
    `ActivationCache.to_arrays`)."""
    return {
        "id": version.id,
        "prompt": version.prompt,
        "settings": version.settings.to_json(),
        "mode": version.mode,
        "stats": version.stats,
        "image_png": image_png,
        "latents": version.latents.detach().cpu().numpy(),
        "mask": None if version.mask is None else version.mask.cpu().numpy(),
        "cache": version.cache.to_arrays(),
    }


def payload_bytes(value) -> int:
    """Bytes of a payload's arrays and byte strings (what it takes in the object store)."""
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.nbytes
    return len(value) if isinstance(value, bytes) else 0


def version_from_payload(payload: dict, parent: Version | None, device: torch.device) -> Version:
    cache = ActivationCache.from_arrays(payload["cache"], parent.cache if parent is not None else None)
    image = Image.open(io.BytesIO(payload["image_png"])).convert("RGB") if payload["image_png"] else None
    mask = None if payload["mask"] is None else torch.from_numpy(np.array(payload["mask"]))
    return Version(
        payload["prompt"],
        Settings(**payload["settings"]),
        payload["mode"],
        torch.from_numpy(np.array(payload["latents"])).to(device),
        image,
        cache,
        payload["stats"],
        parent,
        mask,
        payload["id"],
    )


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class CacheOwner:
    def __init__(self, max_bytes: float = 4 * 2**30, idle_s: float = 3600.0) -> None:
        """`max_bytes`: the budget of the versions held in the object store; `idle_s`: how long an
        unused session's versions stay."""
        self.refs: BoundedLRU[ray.ObjectRef] = BoundedLRU(max_bytes, idle_s, count_evictions("object_store"))

    def put(self, versions: list[tuple[str, str, dict]]) -> None:
        """Store `(session_id, version_id, payload)` of several versions (an editor's batch)."""
        for session_id, version_id, payload in versions:
            self.refs.put((session_id, version_id), ray.put(payload), payload_bytes(payload))

    def get(self, session_id: str, version_id: str) -> list:
        """`[ref]` of the version's payload (nested, so the caller reads the object store), or `[]`."""
        ref = self.refs.get((session_id, version_id))
        return [ref] if ref is not None else []

    def drop(self, session_id: str) -> int:
        return self.refs.drop_session(session_id)

    def check_health(self) -> None:  # Serve calls this every period: idle sessions expire meanwhile
        self.refs.expire()
