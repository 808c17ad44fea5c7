"""fisedit-ray: cache-enabled sparse diffusion inference for text-to-image editing."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fisedit_ray.engine import EditEngine, Settings, Version

__all__ = ["EditEngine", "Settings", "Version"]
__version__ = "0.1.0"

# The engine loads torch and diffusers (seconds): imported on first use, so that a module such as the
# command line's can import the package and answer --help without them.
_LAZY = {
    "EditEngine": "fisedit_ray.engine",
    "Settings": "fisedit_ray.engine",
    "Version": "fisedit_ray.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
