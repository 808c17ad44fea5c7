"""A small Python client of the editing service's HTTP API (needs httpx: the `serve` extra)."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import httpx
import numpy as np
import torch
from PIL import Image


class ServiceError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise ServiceError(response.status_code, str(detail))
    return response


def _mask_png(mask: Image.Image | np.ndarray | torch.Tensor) -> str:
    if not isinstance(mask, Image.Image):
        arr = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        mask = Image.fromarray((arr.astype(bool) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    mask.convert("L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class RemoteSession:
    client: Client
    id: str
    token: str
    root: dict  # the generation's response

    @property
    def _auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def edit(self, version_id: str, prompt: str, mask=None, mode: str = "sparse") -> dict:
        """Edit `version_id` inside `mask` (white/True = edit; latent or image size), or, without
        one, inside the region the service finds; the new version."""
        url = f"/v1/sessions/{self.id}/versions/{version_id}/edits"
        body = {"prompt": prompt, "mask_png": None if mask is None else _mask_png(mask), "mode": mode}
        return self.client.send("POST", url, json=body, headers=self._auth).json()

    def versions(self) -> list[dict]:
        return self.client.send("GET", f"/v1/sessions/{self.id}", headers=self._auth).json()["versions"]

    def image(self, version: dict) -> Image.Image:
        return self._png(version["image_url"])

    def mask(self, version: dict) -> Image.Image:
        return self._png(version["mask_url"])

    def _png(self, path: str) -> Image.Image:
        """A PNG the API links to: its URLs are paths on the server's host, route prefix included."""
        url = self.client.http.base_url.join(path)
        return Image.open(io.BytesIO(self.client.send("GET", url, headers=self._auth).content))

    def delete(self) -> None:
        self.client.send("DELETE", f"/v1/sessions/{self.id}", headers=self._auth)


class Client:
    """`Client("http://127.0.0.1:8000").create_session("a red circle at the top left")`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0, retries: int = 5):
        """`retries`: how often a call refused with 503 or 429 is tried again, after the wait its
        Retry-After asks for (such a call stored nothing)."""
        self.http = httpx.Client(base_url=base_url, timeout=timeout)
        self.retries = retries

    def send(self, method: str, url, **kwargs) -> httpx.Response:
        for _ in range(self.retries):
            response = self.http.request(method, url, **kwargs)
            if response.status_code not in (429, 503) or "retry-after" not in response.headers:
                break
            time.sleep(min(float(response.headers["retry-after"]), 60.0))
        return _check(response)

    def create_session(
        self, prompt: str, *, seed: int = 0, steps: int = 20, guidance: float = 7.5, size: int | None = None
    ) -> RemoteSession:
        body = {"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance, "size": size}
        root = self.send("POST", "/v1/sessions", json=body).json()
        return RemoteSession(self, root["session_id"], root["token"], root)

    def health(self) -> dict:
        return self.send("GET", "/healthz").json()

    def close(self) -> None:
        self.http.close()
