"""The HTTP ingress: sessions, tokens, validation, images; edits without a mask get one from the
mask-generation pool, then every edit goes to the editor pool.

It holds no state: sessions and versions live in the database (`store.SessionStore`), images and
masks in the blob store (`blobs.BlobStore`), so any number of ingress replicas serve any session and
a restart loses nothing. A version is committed before its response is sent. Every session call
needs the session's token (`Authorization: Bearer <token>`); an unknown session or another
session's token gets 404, so ids cannot be probed. A session's calls reach its editor replica
(`routing.SessionRouter`: sticky, balanced, told the replica that served the session last); if that
replica is gone, another one fetches or rebuilds the version from the lineage sent with every call.
A dead replica or database answers 503 with Retry-After: nothing was acknowledged, try again.
"""

import asyncio
import json
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from fisedit_ray.deployments.blobs import BlobStore
from fisedit_ray.deployments.routing import routing_key
from fisedit_ray.deployments.schemas import CreateEdit, CreateSession, parse_body
from fisedit_ray.deployments.store import SessionStore, VersionRow
from fisedit_ray.deployments.telemetry import ServiceMetrics

api = FastAPI(title="fisedit-ray", version="1")
RETRY_AFTER_S = 2
T = TypeVar("T")
Events = Callable[[dict], None]  # where a streamed request's progress events go
WEB = Path(__file__).parent / "web"  # the web editor: static files, no dependencies
WEB_FILES = {"editor.js": "text/javascript", "editor.css": "text/css"}


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def _no_version(session_id: str, version_id: str) -> HTTPException:
    return HTTPException(404, f"session {session_id!r} has no version {version_id!r}")


async def _follow(stream, events: Events) -> dict:
    """The last item of an editor's `run_stream`, handing the steps before it to `events`."""
    result = None
    async for item in stream:
        if "step" in item:
            events({"event": "step", **item})
        else:
            result = item
    return result


def _unavailable(what: str) -> HTTPException:
    return HTTPException(503, f"{what}; nothing was stored, try again", {"Retry-After": str(RETRY_AFTER_S)})


@serve.deployment(
    max_ongoing_requests=32,
    max_queued_requests=64,  # beyond: 503 with Retry-After
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        editor: DeploymentHandle,
        masker: DeploymentHandle,
        database_url: str,
        blob_url: str,
        max_body_bytes: int = 8 * 2**20,
        session_max_edits: int = 32,
    ):
        """`max_body_bytes`: larger bodies get 413. `session_max_edits`: edits of one session this
        replica runs at once; more get 429."""
        self.editor = editor
        self.masker = masker
        self.store = SessionStore(database_url)
        self.blobs = BlobStore(blob_url)
        self.max_body_bytes = max_body_bytes
        self.session_max_edits = session_max_edits
        self.metrics = ServiceMetrics()
        self._in_flight = 0  # editor calls awaited now: the queue depth this replica sees
        self._editing: Counter[str] = Counter()  # edits in flight per session

    # ---- helpers ------------------------------------------------------------------------------
    async def _db(self, call: Callable[..., T], *args) -> T:
        """A store or blob call, off the event loop; a database that cannot be reached is a 503."""
        try:
            return await asyncio.to_thread(call, *args)
        except sa.exc.OperationalError as e:
            raise _unavailable(f"the session database is unavailable ({e.orig})") from None

    async def _authorize(self, session_id: str, authorization: str | None) -> None:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "this call needs the session's token: Authorization: Bearer <token>")
        if not await self._db(self.store.authorized, session_id, authorization.removeprefix("Bearer ")):
            raise HTTPException(404, f"no session {session_id!r} for this token")

    async def _version(self, session_id: str, version_id: str) -> VersionRow:
        version = await self._db(self.store.version, session_id, version_id)
        if version is None:
            raise _no_version(session_id, version_id)
        return version

    def _lineage(self, session_id: str, version_id: str) -> list[dict]:
        """What an editor needs to rebuild `version_id`: its chain from the generation, masks included."""
        lineage = []
        for row in self.store.lineage(session_id, version_id):
            record = {"id": row.id, "prompt": row.prompt, **row.settings}
            if row.parent_id is not None:
                record["mask_png"] = self.blobs.get(row.mask_sha256) if row.mask_sha256 else None
            lineage.append(record)
        return lineage

    async def _call(self, response) -> dict:
        try:
            result = await response
        except (RayActorError, DeploymentUnavailableError) as e:  # killed mid-call: Serve restarts it
            raise _unavailable(f"a replica stopped while serving this request ({type(e).__name__})") from None
        if "error" in result:
            raise HTTPException(400, result["error"])
        return result

    async def _run(
        self, session_id: str, lineage: list[dict], home: str | None, events: Events | None
    ) -> dict:
        """The editor's result for `lineage`; with `events`, its denoising steps as they run."""
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            editor = self.editor.options(session_id=routing_key(session_id, home))
            if events is None:
                result = await self._call(editor.run.remote(session_id, lineage))
            else:
                stream = editor.options(stream=True).run_stream.remote(session_id, lineage)
                result = await self._call(_follow(stream, events))
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
        self.metrics.record("edit" if len(lineage) > 1 else "generate", result["stats"])
        return result

    @staticmethod
    def _view(request: Request, row: VersionRow) -> dict:
        """A version as the API shows it; its URLs are paths on this host, under the app's route
        prefix (Serve passes it as the ASGI root path)."""
        prefix = request.scope.get("root_path", "").rstrip("/")
        base = f"{prefix}/v1/sessions/{row.session_id}/versions/{row.id}"
        return {
            "version_id": row.id,
            "parent": row.parent_id,
            "prompt": row.prompt,
            "image_url": f"{base}/image",
            "mask_url": f"{base}/mask" if row.mask_sha256 is not None else None,
            "warnings": row.stats.get("warnings", []),
            "stats": row.stats,
        }

    @staticmethod
    async def _respond(work: Callable[[Events | None], Awaitable[dict]], stream: bool):
        """`work`'s result as JSON; streamed (`?stream=true`): newline-delimited JSON events as it
        runs (`{"event": "step", "step": i, "steps": n}`, `{"event": "mask"}` while a mask is found),
        then `{"event": "version", ...}`, or `{"event": "error", "status": ..., "detail": ...}` for
        what would have been an error status. The request was validated before the stream starts."""
        if not stream:
            return await work(None)
        events: asyncio.Queue[dict | None] = asyncio.Queue()

        async def produce() -> dict:
            try:
                return await work(events.put_nowait)
            finally:
                events.put_nowait(None)

        # started now, as a task of its own: a client that leaves mid-stream does not stop its edit
        task = asyncio.create_task(produce())

        async def lines() -> AsyncIterator[str]:
            while (event := await events.get()) is not None:
                yield json.dumps(event) + "\n"
            try:
                yield json.dumps({"event": "version", **task.result()}) + "\n"
            except HTTPException as e:
                yield json.dumps({"event": "error", "status": e.status_code, "detail": e.detail}) + "\n"

        return StreamingResponse(lines(), status_code=201, media_type="application/x-ndjson")

    # ---- the web editor -----------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    async def editor_page(self) -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @api.get("/web/{name}", include_in_schema=False)
    async def editor_file(self, name: str) -> FileResponse:
        if name not in WEB_FILES:
            raise HTTPException(404, f"no file {name!r} in the web editor")
        return FileResponse(WEB / name, media_type=WEB_FILES[name])

    # ---- API ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        sessions = await self._db(self.store.count_sessions)
        self.metrics.sessions.set(sessions)
        return {"status": "ok", "sessions": sessions}

    @api.post("/v1/sessions", status_code=201)
    async def create_session(self, request: Request, stream: bool = False):
        body = await parse_body(request, CreateSession, self.max_body_bytes)
        return await self._respond(partial(self._generate, request, body), stream)

    async def _generate(self, request: Request, body: CreateSession, events: Events | None) -> dict:
        session_id, version_id, token = _new_id(), _new_id(), secrets.token_urlsafe(24)
        settings = body.model_dump(exclude={"prompt"})
        lineage = [{"id": version_id, "prompt": body.prompt, **settings}]
        result = await self._run(session_id, lineage, None, events)
        image = await self._db(self.blobs.put, result["image_png"])
        row = VersionRow(version_id, session_id, None, body.prompt, settings, image, None, result["stats"])
        await self._db(self.store.create_session, session_id, token, row)
        return {"session_id": session_id, "token": token, **self._view(request, row)}

    @api.post("/v1/sessions/{session_id}/versions/{version_id}/edits", status_code=201)
    async def create_edit(
        self,
        session_id: str,
        version_id: str,
        request: Request,
        stream: bool = False,
        authorization: str | None = Header(None),
    ):
        await self._authorize(session_id, authorization)
        body = await parse_body(request, CreateEdit, self.max_body_bytes)
        if self._editing[session_id] >= self.session_max_edits:
            raise HTTPException(
                429,
                f"session {session_id!r} has {self.session_max_edits} edits running; wait for one",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self._editing[session_id] += 1  # no await since the check: the two are one step

        async def edit(events: Events | None) -> dict:
            try:
                return await self._edit(request, session_id, version_id, body, events)
            finally:
                self._editing[session_id] -= 1
                if not self._editing[session_id]:
                    del self._editing[session_id]

        return await self._respond(edit, stream)

    async def _edit(
        self, request: Request, session_id: str, version_id: str, body: CreateEdit, events: Events | None
    ) -> dict:
        lineage = await self._db(self._lineage, session_id, version_id)
        if not lineage:
            raise _no_version(session_id, version_id)
        new_id = _new_id()
        step = {"id": new_id, "prompt": body.prompt, "mask_png": body.mask_bytes(), "mode": body.mode}
        settings = {"mode": body.mode}
        if step["mask_png"] is None and body.mode != "dense":  # frozen: a rebuild reproduces the edit
            if events is not None:
                events({"event": "mask"})
            found = await self._call(self.masker.find.remote([*lineage, step]))
            step["mask_png"], settings["capture"] = found["mask_png"], found["stats"]
            step["capture"] = found["stats"]
        home = await self._db(self.store.home, session_id)
        result = await self._run(session_id, [*lineage, step], home, events)
        image = await self._db(self.blobs.put, result["image_png"])
        mask = await self._db(self.blobs.put, result["mask_png"])  # a dense edit's: the whole image
        row = VersionRow(new_id, session_id, version_id, body.prompt, settings, image, mask, result["stats"])
        if not await self._db(self.store.add_version, row):
            raise HTTPException(404, f"session {session_id!r} was deleted while the edit ran")
        return self._view(request, row)

    @api.get("/v1/sessions/{session_id}")
    async def version_tree(
        self, session_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict:
        await self._authorize(session_id, authorization)
        rows = await self._db(self.store.versions, session_id)
        return {"session_id": session_id, "versions": [self._view(request, row) for row in rows]}

    @api.get("/v1/sessions/{session_id}/versions/{version_id}/image")
    async def image(self, session_id: str, version_id: str, authorization: str | None = Header(None)):
        await self._authorize(session_id, authorization)
        version = await self._version(session_id, version_id)
        return Response(await self._db(self.blobs.get, version.image_sha256), media_type="image/png")

    @api.get("/v1/sessions/{session_id}/versions/{version_id}/mask")
    async def mask(self, session_id: str, version_id: str, authorization: str | None = Header(None)):
        await self._authorize(session_id, authorization)
        version = await self._version(session_id, version_id)
        if version.mask_sha256 is None:
            raise HTTPException(404, f"version {version_id!r} is a generation: it has no mask")
        return Response(await self._db(self.blobs.get, version.mask_sha256), media_type="image/png")

    @api.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str, authorization: str | None = Header(None)) -> dict:
        await self._authorize(session_id, authorization)
        home = await self._db(self.store.home, session_id)
        deleted = await self._db(self.store.delete_session, session_id)
        try:
            editor = self.editor.options(session_id=routing_key(session_id, home))
            freed = await editor.drop.remote(session_id)
        except (RayActorError, DeploymentUnavailableError):
            freed = 0  # its replica is gone, and its hot versions with it
        return {"deleted": session_id, "versions": deleted, "versions_freed_on_replica": freed}
