"""Request bodies of the HTTP API, validated by FastAPI before anything runs."""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SIDE = 1024


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE)
    size: int | None = Field(None, ge=8, le=MAX_SIDE, description="Image side in pixels (model default)")


class CreateEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    mask_png: str | None = Field(
        None, description="Base64 PNG, white = edit, at latent or image size; omitted: the service finds it"
    )
    mode: str = Field("sparse", pattern="^(sparse|dense|reference)$")

    @field_validator("mask_png")
    @classmethod
    def _decodes(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"mask_png is not base64: {e}") from e
            if not data.startswith(b"\x89PNG\r\n\x1a\n"):
                raise ValueError("mask_png is not a PNG image")
        return value

    def mask_bytes(self) -> bytes | None:
        return None if self.mask_png is None else base64.b64decode(self.mask_png)
