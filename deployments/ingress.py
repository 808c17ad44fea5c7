"""The HTTP ingress: sessions, tokens, validation, images; edits without a mask get one from the
mask-generation pool, then every edit goes to the editor pool.

Every session call needs the session's token (`Authorization: Bearer <token>`); an unknown session
or another session's token gets 404, so ids cannot be probed. A session's calls reach its editor
replica by the session id (`routing.SessionRouter`: sticky, balanced); if that replica is gone,
another one fetches or rebuilds the version from the lineage the ingress sends with every call.
"""

import secrets
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Header, HTTPException, Request, Response
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from fisedit_ray.deployments.schemas import CreateEdit, CreateSession
from fisedit_ray.deployments.telemetry import ServiceMetrics

api = FastAPI(title="fisedit-ray", version="1")


@dataclass
class VersionRecord:
    lineage: list[dict]  # root first, this version last: what the editor needs to rebuild it
    parent: str | None
    prompt: str
    image_png: bytes
    mask_png: bytes | None
    stats: dict


@dataclass
class SessionRecord:
    token: str
    versions: dict[str, VersionRecord] = field(default_factory=dict)


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


@serve.deployment(
    max_ongoing_requests=32,
    max_queued_requests=64,  # beyond: 503 with Retry-After
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=2),
)
@serve.ingress(api)
class Ingress:
    def __init__(self, editor: DeploymentHandle, masker: DeploymentHandle):
        self.editor = editor
        self.masker = masker
        self.sessions: dict[str, SessionRecord] = {}
        self.metrics = ServiceMetrics()
        self._in_flight = 0  # editor calls awaited now: the queue depth this replica sees

    # ---- helpers ------------------------------------------------------------------------------
    def _session(self, session_id: str, authorization: str | None) -> SessionRecord:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "this call needs the session's token: Authorization: Bearer <token>")
        session = self.sessions.get(session_id)
        token = authorization.removeprefix("Bearer ")
        if session is None or not secrets.compare_digest(session.token, token):
            raise HTTPException(404, f"no session {session_id!r} for this token")
        return session

    def _version(self, session: SessionRecord, session_id: str, version_id: str) -> VersionRecord:
        version = session.versions.get(version_id)
        if version is None:
            raise HTTPException(404, f"session {session_id!r} has no version {version_id!r}")
        return version

    async def _find_mask(self, lineage: list[dict]) -> tuple[bytes, dict]:
        """The mask generator's mask for the last edit of `lineage` (PNG) and how it was found."""
        result = await self.masker.find.remote(lineage)
        if "error" in result:
            raise HTTPException(400, result["error"])
        return result["mask_png"], result["stats"]

    async def _run(self, session_id: str, lineage: list[dict]) -> dict:
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            result = await self.editor.options(session_id=session_id).run.remote(session_id, lineage)
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
        if "error" in result:
            raise HTTPException(400, result["error"])
        self.metrics.record("edit" if len(lineage) > 1 else "generate", result["stats"])
        return result

    @staticmethod
    def _view(request: Request, session_id: str, version_id: str, record: VersionRecord) -> dict:
        """A version as the API shows it; its URLs are paths on this host, under the app's route
        prefix (Serve passes it as the ASGI root path)."""
        prefix = request.scope.get("root_path", "").rstrip("/")
        base = f"{prefix}/v1/sessions/{session_id}/versions/{version_id}"
        return {
            "version_id": version_id,
            "parent": record.parent,
            "prompt": record.prompt,
            "image_url": f"{base}/image",
            "mask_url": f"{base}/mask" if record.mask_png is not None else None,
            "stats": record.stats,
        }

    # ---- API ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "sessions": len(self.sessions)}

    @api.post("/v1/sessions", status_code=201)
    async def create_session(self, body: CreateSession, request: Request) -> dict:
        session_id, version_id = _new_id(), _new_id()
        root = {"id": version_id, **body.model_dump()}
        result = await self._run(session_id, [root])
        session = SessionRecord(token=secrets.token_urlsafe(24))
        record = VersionRecord([root], None, body.prompt, result["image_png"], None, result["stats"])
        session.versions[version_id] = record
        self.sessions[session_id] = session
        self.metrics.sessions.set(len(self.sessions))
        view = self._view(request, session_id, version_id, record)
        return {"session_id": session_id, "token": session.token, **view}

    @api.post("/v1/sessions/{session_id}/versions/{version_id}/edits", status_code=201)
    async def create_edit(
        self,
        session_id: str,
        version_id: str,
        body: CreateEdit,
        request: Request,
        authorization: str | None = Header(None),
    ) -> dict:
        session = self._session(session_id, authorization)
        parent = self._version(session, session_id, version_id)
        new_id = _new_id()
        step = {"id": new_id, "prompt": body.prompt, "mask_png": body.mask_bytes(), "mode": body.mode}
        lineage = [*parent.lineage, step]
        if step["mask_png"] is None and body.mode != "dense":  # frozen: a rebuild reproduces the edit
            step["mask_png"], step["capture"] = await self._find_mask(lineage)
        result = await self._run(session_id, lineage)
        if session_id not in self.sessions:  # deleted while the edit ran
            raise HTTPException(404, f"session {session_id!r} was deleted")
        step["mask_png"] = result["mask_png"]  # a dense edit's: the whole image
        record = VersionRecord(
            lineage, version_id, body.prompt, result["image_png"], result["mask_png"], result["stats"]
        )
        session.versions[new_id] = record
        return self._view(request, session_id, new_id, record)

    @api.get("/v1/sessions/{session_id}")
    async def version_tree(
        self, session_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict:
        session = self._session(session_id, authorization)
        return {
            "session_id": session_id,
            "versions": [self._view(request, session_id, vid, rec) for vid, rec in session.versions.items()],
        }

    @api.get("/v1/sessions/{session_id}/versions/{version_id}/image")
    async def image(self, session_id: str, version_id: str, authorization: str | None = Header(None)):
        version = self._version(self._session(session_id, authorization), session_id, version_id)
        return Response(version.image_png, media_type="image/png")

    @api.get("/v1/sessions/{session_id}/versions/{version_id}/mask")
    async def mask(self, session_id: str, version_id: str, authorization: str | None = Header(None)):
        version = self._version(self._session(session_id, authorization), session_id, version_id)
        if version.mask_png is None:
            raise HTTPException(404, f"version {version_id!r} is a generation: it has no mask")
        return Response(version.mask_png, media_type="image/png")

    @api.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str, authorization: str | None = Header(None)) -> dict:
        self._session(session_id, authorization)
        del self.sessions[session_id]
        self.metrics.sessions.set(len(self.sessions))
        freed = await self.editor.options(session_id=session_id).drop.remote(session_id)
        return {"deleted": session_id, "versions_freed_on_replica": freed}
