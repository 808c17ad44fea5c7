"""The editor deployment: one `EditEngine` and the hot versions of the sessions routed to it.

Requests carry a version's lineage (the generation's parameters and the edit chain from the root),
so a replica that does not hold a version, after a reroute or a restart, rebuilds it by replaying
the lineage: the engine is deterministic, so the rebuilt version is the same image and cache.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import torch
from PIL import Image
from ray import serve

from fisedit_ray import EditEngine
from fisedit_ray.engine import Version
from fisedit_ray.masks import mask_image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Editor:
    def __init__(
        self, model: str = "scenes", cache_dtype: str | None = None, threads: int = 1, max_versions: int = 256
    ):
        torch.set_num_threads(threads)  # explicit: results depend on it in their last bits
        self.engine = EditEngine.from_pretrained(model, cache_dtype=cache_dtype)
        self.max_versions = max_versions
        self.hot: OrderedDict[tuple[str, str], Version] = OrderedDict()  # LRU of versions

    def replica(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    def run(self, session_id: str, lineage: list[dict]) -> dict:
        """Produce the last version of `lineage` (root first), rebuilding missing ancestors.

        Returns its PNGs and stats, or `{"error": message}` for input the engine refuses (nothing is
        kept then)."""
        try:
            rebuilt, version = self._materialise(session_id, lineage)
        except ValueError as e:
            return {"error": str(e)}
        mask = None if version.mask is None else mask_image(version.mask, self.engine.vae_scale)
        return {
            "version_id": version.id,
            "image_png": png(version.image),
            "mask_png": None if mask is None else png(mask),
            "stats": {**version.stats, "replica": self.replica(), "rebuilt": rebuilt},
        }

    def drop(self, session_id: str) -> int:
        """Forget a session's versions (their caches go with them)."""
        keys = [k for k in self.hot if k[0] == session_id]
        for k in keys:
            del self.hot[k]
        return len(keys)

    def check_health(self) -> None:  # Ray Serve calls this; raising marks the replica unhealthy
        if self.engine is None:
            raise RuntimeError("no engine")

    def _materialise(self, session_id: str, lineage: list[dict]) -> tuple[list[str], Version]:
        start = len(lineage)
        while start > 0 and (session_id, lineage[start - 1]["id"]) not in self.hot:
            start -= 1
        version = self.hot[(session_id, lineage[start - 1]["id"])] if start else None
        if version is not None:
            self.hot.move_to_end((session_id, version.id))
        rebuilt = []
        for i, record in enumerate(lineage[start:], start):
            version = self._compute(record, version)
            self._keep(session_id, version)
            if i < len(lineage) - 1:
                rebuilt.append(version.id)
        return rebuilt, version

    def _compute(self, record: dict, parent: Version | None) -> Version:
        if parent is None:
            version = self.engine.generate(
                record["prompt"],
                seed=record["seed"],
                num_inference_steps=record["steps"],
                guidance_scale=record["guidance"],
                height=record["size"],
                width=record["size"],
            )
        else:
            if not record["mask_png"]:
                raise ValueError("an edit needs a mask: automatic masks are not served yet")
            try:
                mask = Image.open(io.BytesIO(record["mask_png"]))
                mask.load()
            except OSError as e:
                raise ValueError(f"mask_png cannot be read as an image: {e}") from e
            version = self.engine.edit(parent, record["prompt"], mask=mask, mode=record["mode"])
        version.id = record["id"]
        return version

    def _keep(self, session_id: str, version: Version) -> None:
        self.hot[(session_id, version.id)] = version
        while len(self.hot) > self.max_versions:
            self.hot.popitem(last=False)
