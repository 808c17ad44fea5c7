"""The mask-generation deployment: Target Area Capture for edits that come without a mask.

It holds no caches. A mask needs only the lineage's settings and the parent's and the edit's prompts
(`EditEngine.find_mask_uncached`, the same mask as the engine finds from the parent's cache), so any
replica serves any session, and this pool scales apart from the editors that hold the caches. The
ingress freezes the mask into the lineage before the edit goes to an editor, whose batcher then
groups edits by the sparsity they run at.
"""

from __future__ import annotations

import asyncio
import time

import torch

from fisedit_ray import EditEngine
from fisedit_ray.deployments.cache_owner import png
from fisedit_ray.masks import mask_image


class MaskGenerator:
    def __init__(self, model: str = "scenes", threads: int = 1):
        torch.set_num_threads(threads)  # as the editors: the same bits as their engines' masks
        self.engine = EditEngine.from_pretrained(model, device="auto")  # its GPU, if it was given one

    async def find(self, lineage: list[dict]) -> dict:
        """The mask of the last edit of `lineage` (root first) as a PNG at image resolution, with
        how it was found (stats), or `{"error": message}` for input the engine refuses."""
        root, parent, edit = lineage[0], lineage[-2], lineage[-1]
        start = time.perf_counter()
        try:
            settings = self.engine.settings(
                root["seed"], root["steps"], root["guidance"], root["size"], root["size"]
            )
            parent_mode = parent.get("mode", "generate")  # the root record is the generation
            mask, found = await asyncio.to_thread(  # off the event loop, as the editors' engines
                self.engine.find_mask_uncached, settings, parent["prompt"], parent_mode, edit["prompt"]
            )
        except ValueError as e:
            return {"error": str(e)}
        found["capture_seconds"] = time.perf_counter() - start
        return {"mask_png": png(mask_image(mask, self.engine.vae_scale)), "stats": found}

    def check_health(self) -> None:  # Ray Serve calls this; raising marks the replica unhealthy
        if self.engine is None:
            raise RuntimeError("no engine")
