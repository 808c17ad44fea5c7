"""Images and masks by content hash, in a folder or any fsspec URL (`s3://bucket/fisedit`, ...).

A blob's name is the SHA-256 of its bytes, so a blob is written once, never changes, and any number
of ingress replicas can read and cache it without coordination.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from functools import lru_cache

import fsspec

_HASH = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)
        self._local = "file" in self.fs.protocol
        self.get = lru_cache(maxsize=128)(self._read)  # immutable: safe to cache per process

    def _path(self, digest: str) -> str:
        if not _HASH.fullmatch(digest):
            raise ValueError(f"{digest!r} is not a blob address (a SHA-256 in hex)")
        return f"{self.root}/{digest[:2]}/{digest}"

    def put(self, data: bytes) -> str:
        """Store `data`; its address. Written whole or not at all: a reader never sees a partial blob."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if self.fs.exists(path):
            return digest
        if self._local:  # a rename is atomic on one file system
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            self.fs.pipe_file(partial, data)
            self.fs.mv(partial, path)
        else:  # object stores publish an object only once its upload completes
            self.fs.pipe_file(path, data)
        return digest

    def _read(self, digest: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(digest))
        except FileNotFoundError:
            raise KeyError(f"no blob {digest} in {self.url}") from None
