"""The editor deployment: one `EditEngine` and the hot versions of the sessions routed to it.

Requests carry a version's lineage (the generation's parameters and the edit chain from the root),
so a replica that does not hold a version, after a reroute or a restart, rebuilds it by replaying
the lineage: the engine is deterministic, so the rebuilt version is the same image and cache. Before
rebuilding, it fetches what it can from the cache owner (`cache_owner`): every version a replica
computes is stored there, in the object store.

An edit without a mask gets one from the mask-generation pool (`masker`) on its way here: the ingress
freezes it into the lineage, with how it was found (`capture`). Sparse edits whose parent is hot go
through a batcher (`@serve.batch`): the edits that arrive
together are grouped by step count, guidance and sparsity bucket, and each group runs as one
`EditEngine.edit_batch` (one sparse pass per step for all of them). Edits that arrive while a batch
runs wait for it to finish and then form the next batch together.

The engine runs in a worker thread (it serves one call at a time, `EditEngine`'s lock), never on
the replica's event loop: a loop blocked by seconds of compute per queued request delays the
replica's health checks past their timeout under load, and Serve then kills a busy replica.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

import torch
from PIL import Image
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from fisedit_ray import EditEngine
from fisedit_ray.deployments.budget import BoundedLRU
from fisedit_ray.deployments.cache_owner import png, version_from_payload, version_payload
from fisedit_ray.deployments.telemetry import count_evictions
from fisedit_ray.engine import Progress, Version
from fisedit_ray.masks import mask_image, to_latent_mask

SPARSITY_BUCKET = 0.1  # edits batched together differ by less than this in mask ratio
OWNER_TIMEOUT_S = 10.0  # a cache owner that does not answer (dead, restarting) is skipped
logger = logging.getLogger("ray.serve")


class Editor:
    """An engine, its hot versions, and the way to get any version of a session's lineage."""

    def __init__(
        self,
        model: str = "scenes",
        cache_dtype: str | None = None,
        cache_device: str | None = None,
        threads: int = 1,
        hot_bytes: float = 4 * 2**30,
        idle_s: float = 3600.0,
        owner: DeploymentHandle | None = None,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.1,
        keep_caches: bool = True,
        compile_ratios: tuple[float, ...] = (),
    ):
        """`hot_bytes`, `idle_s`: the byte budget of the versions kept hot here (least recently used
        evicted first) and how long an unused session's versions stay. `compile_ratios`: run sparse
        steps as compiled programs, and compile those of edits with masks of these ratios before the
        replica reports healthy (others compile on first use)."""
        self.owner = owner
        self.keep_caches = keep_caches  # False: a plain deployment, which serves dense edits only
        self._sparse_batch.set_max_batch_size(max_batch_size)  # 1: every edit runs alone
        # a session's next edit arrives a round trip after its last one returned: waiting that
        # long lets the edits that finished together run together again
        self._sparse_batch.set_batch_wait_timeout_s(batch_wait_s)
        torch.set_num_threads(threads)  # explicit: results depend on it in their last bits
        # the replica's GPU where it was given one (Ray hides the others), else its CPUs
        self.engine = EditEngine.from_pretrained(
            model,
            device="auto",
            cache_dtype=cache_dtype,
            cache_device=cache_device,
            compile=bool(compile_ratios),
        )
        self.engine.warm_up(compile_ratios)
        # a budget for the versions' own caches (a generation's is big); an evicted version comes
        # back from the cache owner, or is rebuilt
        self.hot: BoundedLRU[Version] = BoundedLRU(hot_bytes, idle_s, count_evictions("editor"))
        # `serve.batch` forms a batch while the previous one still runs; edits that come back at
        # slightly different times would then run as two half batches, out of phase for good.
        # Edits wait here while a batch runs, and join the next one together once it is done.
        self._engine_idle = asyncio.Event()
        self._engine_idle.set()

    def replica(self) -> str:
        return serve.get_replica_context().replica_id.unique_id

    async def run(self, session_id: str, lineage: list[dict]) -> dict:
        """Produce the last version of `lineage` (root first), fetching or rebuilding ancestors.

        Returns its PNGs and stats, or `{"error": message}` for input the engine refuses (nothing is
        kept then)."""
        return await self._produce(session_id, lineage, None)

    async def run_stream(self, session_id: str, lineage: list[dict]) -> AsyncIterator[dict]:
        """`run`, streamed (`handle.options(stream=True)`): `{"step": i, "steps": n}` after each
        denoising step of the last version, then `run`'s result."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict | None] = asyncio.Queue()

        def progress(done: int, total: int) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, {"step": done, "steps": total})

        task = asyncio.create_task(self._produce(session_id, lineage, progress))
        # after the steps' events: the engine thread's last callback is queued before its result
        task.add_done_callback(lambda _: events.put_nowait(None))
        while (event := await events.get()) is not None:
            yield event
        yield await task

    async def _produce(self, session_id: str, lineage: list[dict], progress: Progress | None) -> dict:
        try:
            record = lineage[-1]
            if not self.keep_caches and record.get("mode", "dense") != "dense":
                raise ValueError("this deployment keeps no activation caches: it serves dense edits only")
            parent = self._hot(session_id, lineage[-2]["id"]) if len(lineage) > 1 else None
            mask = None if parent is None else self._latent_mask(parent, record)
            if mask is not None and record["mode"] == "sparse":
                self.engine.check_prompt(record["prompt"])  # refused here, alone, not in a batch
                await self._engine_idle.wait()
                version, image_png = await self._sparse_batch(session_id, parent, record, mask, progress)
                fetched, rebuilt = [], []
            else:
                fetched, rebuilt, version = await self._materialise(session_id, lineage, progress)
                (image_png,) = await self._finish([(session_id, record, version)])
        except ValueError as e:
            return {"error": str(e)}
        return self._result(version, image_png, fetched, rebuilt)

    @serve.batch
    async def _sparse_batch(
        self, session_ids: list[str], parents: list, records: list, masks: list, progresses: list
    ) -> list[tuple[Version, bytes]]:
        self._engine_idle.clear()
        try:
            return await self._run_batch(session_ids, parents, records, masks, progresses)
        finally:
            self._engine_idle.set()

    async def _run_batch(
        self, session_ids: list[str], parents: list, records: list, masks: list, progresses: list
    ) -> list[tuple[Version, bytes]]:
        groups = defaultdict(list)
        for i, (parent, mask) in enumerate(zip(parents, masks, strict=True)):
            groups[batch_key(parent, mask)].append(i)
        versions: list = [None] * len(parents)
        for members in groups.values():
            requests = [(parents[i], records[i]["prompt"], masks[i]) for i in members]
            followers = [progresses[i] for i in members if progresses[i] is not None]
            edited = await asyncio.to_thread(self.engine.edit_batch, requests, progress=_fan_out(followers))
            for i, version in zip(members, edited, strict=True):
                version.id = records[i]["id"]
                versions[i] = version
        image_pngs = await self._finish(list(zip(session_ids, records, versions, strict=True)))
        return list(zip(versions, image_pngs, strict=True))

    async def _finish(self, done: list[tuple[str, dict, Version]]) -> list[bytes]:
        """Count the mask generator's work in each new version's stats, keep the versions hot and
        store them with the cache owner, all of a batch in one call (a call costs both sides about
        4 ms of CPU besides the bytes). Returns each version's image as PNG, encoded once for the
        owner and the reply."""
        image_pngs = []
        for session_id, record, version in done:
            add_capture(version.stats, record.get("capture"))
            self._keep(session_id, version)
            image_pngs.append(png(version.image))
        if self.owner is not None:
            payloads = [
                (sid, v.id, version_payload(v, image_png))
                for (sid, _, v), image_png in zip(done, image_pngs, strict=True)
            ]
            await self._ask_owner("put", payloads)
        return image_pngs

    async def _ask_owner(self, method: str, *args):
        """A call to the cache owner, or None if it cannot answer now: the object store is a cache
        (the database and blob store keep what was acknowledged), and a version it lacks is rebuilt."""
        try:
            return await asyncio.wait_for(getattr(self.owner, method).remote(*args), OWNER_TIMEOUT_S)
        except (RayError, RayServeException, TimeoutError) as e:
            logger.warning(f"cache owner unavailable for {method}: {type(e).__name__}: {e}")
            return None

    def _hot(self, session_id: str, version_id: str) -> Version | None:
        return self.hot.get((session_id, version_id))

    def _latent_mask(self, parent: Version, record: dict) -> torch.Tensor | None:
        mask = self._mask_image(record)
        if mask is None:
            return None
        return to_latent_mask(mask, self.engine.latent_size(parent.settings), self.engine.vae_scale)

    def _result(self, version: Version, image_png: bytes, fetched: list[str], rebuilt: list[str]) -> dict:
        mask = None if version.mask is None else mask_image(version.mask, self.engine.vae_scale)
        return {
            "version_id": version.id,
            "image_png": image_png,
            "mask_png": None if mask is None else png(mask),
            "stats": {**version.stats, "replica": self.replica(), "fetched": fetched, "rebuilt": rebuilt},
        }

    async def drop(self, session_id: str) -> int:
        """Forget a session's versions, here and in the cache owner."""
        if self.owner is not None:
            await self._ask_owner("drop", session_id)
        return self.hot.drop_session(session_id)

    def check_health(self) -> None:  # Ray Serve calls this; raising marks the replica unhealthy
        if self.engine is None:
            raise RuntimeError("no engine")
        self.hot.expire()  # every health check period: idle sessions go even when no call comes

    async def _materialise(
        self, session_id: str, lineage: list[dict], progress: Progress | None = None
    ) -> tuple[list, list, Version]:
        """The last version of `lineage`: its nearest hot ancestor, then ancestors fetched from the
        cache owner, then the rest computed (rebuilt, for ancestors; `progress` follows the last)."""
        start = len(lineage)
        while start > 0 and (session_id, lineage[start - 1]["id"]) not in self.hot:
            start -= 1
        version = self._hot(session_id, lineage[start - 1]["id"]) if start else None
        fetched, rebuilt = [], []
        for record in lineage[start:-1]:
            payload = await self._fetch(session_id, record["id"])
            if payload is None:
                break
            version = version_from_payload(payload, version, self.engine.device)
            self._keep(session_id, version)
            fetched.append(version.id)
            start += 1
        for record in lineage[start:-1]:
            version = await asyncio.to_thread(self._compute, record, version)
            self._keep(session_id, version)
            rebuilt.append(version.id)
        return fetched, rebuilt, await asyncio.to_thread(self._compute, lineage[-1], version, progress)

    async def _fetch(self, session_id: str, version_id: str) -> dict | None:
        refs = await self._ask_owner("get", session_id, version_id) if self.owner is not None else None
        if not refs:
            return None
        try:
            return await refs[0]
        except RayError:  # its owner died since: the object went with it
            return None

    def _compute(self, record: dict, parent: Version | None, progress: Progress | None = None) -> Version:
        if parent is None:
            version = self.engine.generate(
                record["prompt"],
                seed=record["seed"],
                num_inference_steps=record["steps"],
                guidance_scale=record["guidance"],
                height=record["size"],
                width=record["size"],
                record=self.keep_caches,
                progress=progress,
            )
        else:
            mask = self._mask_image(record)
            version = self.engine.edit(
                parent,
                record["prompt"],
                mask=mask,
                mode=record["mode"],
                record=self.keep_caches,
                progress=progress,
            )
        version.id = record["id"]
        return version

    @staticmethod
    def _mask_image(record: dict) -> Image.Image | None:
        """The edit's mask, or None: Target Area Capture finds it."""
        return read_mask_png(record["mask_png"])

    def _keep(self, session_id: str, version: Version) -> None:
        self.hot.put((session_id, version.id), version, version.stats["cache_bytes"]["total"])


def _fan_out(followers: list[Progress]) -> Progress | None:
    """One progress callback for a batch: each of its edits' callbacks."""
    if not followers:
        return None

    def progress(done: int, total: int) -> None:
        for follower in followers:
            follower(done, total)

    return progress


def batch_key(parent: Version, mask: torch.Tensor) -> tuple:
    """Sparse edits with equal keys run as one batched pass: the same step count and guidance, and
    similar work (mask ratio buckets 0-10%, 10-20%, 20-30%, more)."""
    bucket = min(int(float(mask.float().mean()) / SPARSITY_BUCKET), 3)
    return (parent.settings.num_inference_steps, parent.settings.guidance_scale > 1.0, bucket)


def read_mask_png(data: bytes | None) -> Image.Image | None:
    """A mask sent as PNG bytes, decoded; None for none. Unreadable bytes are a ValueError."""
    if not data:
        return None
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except OSError as e:
        raise ValueError(f"mask_png cannot be read as an image: {e}") from e
    return mask


def add_capture(stats: dict, capture: dict | None) -> None:
    """Count the mask generator's work (`capture`: its stats of the edit's mask) in the edit's stats,
    as the engine counts a mask it finds itself."""
    if capture is None:
        return
    stats |= {k: capture[k] for k in ("capture_steps", "capture_macs", "mask_source")}
    stats["macs_executed"] += capture["capture_macs"]
    stats["seconds"] = {**stats["seconds"], "mask": capture["capture_seconds"]}
    stats["seconds"]["total"] += capture["capture_seconds"]
