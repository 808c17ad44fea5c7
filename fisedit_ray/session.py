"""A session on disk: a tree of versions with their metadata, images, masks and caches.

session.json                 model, storage dtype, the versions in creation order
versions/<id>/version.json   prompt, mode, parent, settings, stats
versions/<id>/latents.safetensors, image.png, mask.png, overlay.png
versions/<id>/cache/         the activation cache (a delta over the parent's for an edit)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fisedit_ray.cache import ActivationCache
from fisedit_ray.engine import Settings, Version
from fisedit_ray.masks import mask_image, overlay

FORMAT_VERSION = 1


class SessionError(ValueError):
    """A session folder that is missing, incomplete or corrupt."""


class Session:
    def __init__(self, folder: Path, model: str, versions: dict[str, Version]):
        self.folder, self.model, self.versions = folder, model, versions

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / "session.json").exists()

    @classmethod
    def create(cls, folder: str | Path, model: str) -> Session:
        folder = Path(folder)
        if cls.exists(folder):
            raise SessionError(f"{folder} already holds a session; edit it or choose another folder")
        folder.mkdir(parents=True, exist_ok=True)
        session = cls(folder, model, {})
        session._write_index()
        return session

    @classmethod
    def open(cls, folder: str | Path) -> Session:
        folder = Path(folder)
        index_path = folder / "session.json"
        if not index_path.is_file():
            raise SessionError(f"no session in {folder}: {index_path.name} is missing")
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != FORMAT_VERSION:
                raise SessionError(f"unsupported session format {index.get('format')!r}")
            session = cls(folder, index["model"], {})
            for vid in index["versions"]:
                session.versions[vid] = session._load_version(vid)
        except SessionError:
            raise
        except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError, SafetensorError) as e:
            raise SessionError(f"corrupt session in {folder}: {e}") from e
        return session

    @property
    def latest(self) -> Version:
        if not self.versions:
            raise SessionError(f"session {self.folder} has no versions yet")
        return next(reversed(self.versions.values()))

    def get(self, vid: str) -> Version:
        if vid not in self.versions:
            raise SessionError(f"session {self.folder} has no version {vid!r}; it has {list(self.versions)}")
        return self.versions[vid]

    def add(self, version: Version, vae_scale: int) -> Path:
        """Give `version` the next id, write it, and return its folder."""
        if version.parent is not None and version.parent.id not in self.versions:
            raise SessionError("an edit's parent must belong to the session")
        version.id = f"v{len(self.versions)}"
        folder = self.folder / "versions" / version.id
        folder.mkdir(parents=True, exist_ok=False)
        meta = {
            "id": version.id,
            "parent": version.parent.id if version.parent is not None else None,
            "prompt": version.prompt,
            "mode": version.mode,
            "settings": version.settings.to_json(),
            "stats": version.stats,
        }
        tensors = {"latents": version.latents.cpu().contiguous()}
        if version.mask is not None:
            tensors["mask"] = version.mask.cpu().contiguous()
            mask_image(version.mask, vae_scale).save(folder / "mask.png")
            if version.image is not None:
                overlay(version.image, version.mask, vae_scale).save(folder / "overlay.png")
        save_file(tensors, folder / "latents.safetensors")
        if version.image is not None:
            version.image.save(folder / "image.png")
        version.cache.save(folder / "cache")
        (folder / "version.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        self.versions[version.id] = version
        self._write_index()
        return folder

    def _write_index(self) -> None:
        index = {"format": FORMAT_VERSION, "model": self.model, "versions": list(self.versions)}
        (self.folder / "session.json").write_text(json.dumps(index, indent=1))

    def _load_version(self, vid: str) -> Version:
        folder = self.folder / "versions" / vid
        if not folder.is_dir():
            raise SessionError(f"corrupt session in {self.folder}: version folder {vid} is missing")
        meta = json.loads((folder / "version.json").read_text())
        parent = self.versions[meta["parent"]] if meta["parent"] is not None else None
        tensors = load_file(folder / "latents.safetensors")
        image_path = folder / "image.png"
        image = Image.open(image_path).convert("RGB") if image_path.exists() else None
        cache = ActivationCache.load(folder / "cache", parent.cache if parent is not None else None)
        return Version(
            prompt=meta["prompt"],
            settings=Settings(**meta["settings"]),
            mode=meta["mode"],
            latents=tensors["latents"],
            image=image,
            cache=cache,
            stats=meta["stats"],
            parent=parent,
            mask=tensors.get("mask"),
            id=vid,
        )


def _jsonable(value):
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in version.json")
