"""Request bodies of the HTTP API: JSON, or multipart / URL-encoded forms (`curl -F prompt=... -F
mask=@mask.png`), read under a size limit and validated before anything runs. Every refusal is a
4xx whose `detail` says what is wrong."""

from __future__ import annotations

import base64
import binascii
import json
from typing import TypeVar

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SIDE = 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _HasPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():  # the engine's rule, here before anything runs or is batched
            raise ValueError("the prompt is blank: describe the image")
        return value


class CreateSession(_HasPrompt):
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE)
    size: int | None = Field(None, ge=8, le=MAX_SIDE, description="Image side in pixels (model default)")


class CreateEdit(_HasPrompt):
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
            check_png_header(data)
        return value

    def mask_bytes(self) -> bytes | None:
        return None if self.mask_png is None else base64.b64decode(self.mask_png)


def check_png_header(data: bytes) -> None:
    """Refuse what is not a PNG, or declares more than MAX_SIDE pixels a side, before any decoding
    (a few bytes can declare gigapixels)."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("mask_png is not a PNG image")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"mask_png declares {width} x {height} pixels; a mask is at most {MAX_SIDE} a side")


Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, model: type[Body], max_bytes: int) -> Body:
    """`model` from the request's JSON, or from its form fields (a file field `mask` is the mask)."""
    data = await _read(request, max_bytes)
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields = await _form(request, data)
    elif kind in ("application/json", ""):
        try:
            fields = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise HTTPException(400, f"the body is not valid UTF-8: {e}") from None
        except json.JSONDecodeError as e:
            raise HTTPException(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise HTTPException(422, "the body must be a JSON object")
    else:
        raise HTTPException(415, f"unsupported content type {kind!r}: send JSON or a multipart form")
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        detail = [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors()]
        raise HTTPException(422, detail) from None


async def _read(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"the body is {declared} bytes; the limit is {max_bytes} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_bytes:
            raise HTTPException(413, f"the body is over {max_bytes} bytes; the limit is {max_bytes} bytes")
    return bytes(data)


async def _form(request: Request, data: bytes) -> dict:
    async def replay() -> dict:  # the body was read already: hand it to the form parser again
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as e:  # the parser's errors vary by cause; any of them is a malformed form
        raise HTTPException(400, f"the form cannot be read: {e}") from None
    fields = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "mask":
                raise HTTPException(422, f"form field {name!r} must be text; only 'mask' is a file")
            name, value = "mask_png", base64.b64encode(await value.read()).decode()
        if name in fields:
            raise HTTPException(422, f"form field {name!r} is given twice")
        fields[name] = value
    return fields
