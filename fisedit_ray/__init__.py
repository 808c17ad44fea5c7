"""fisedit-ray: cache-enabled sparse diffusion inference for text-to-image editing."""

from fisedit_ray.engine import EditEngine, Settings, Version

__all__ = ["EditEngine", "Settings", "Version"]
__version__ = "0.1.0"
