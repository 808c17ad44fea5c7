"""What the service tests share: a local Ray for Serve, and masks and images as the API carries them."""

import base64
import io
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from fisedit_ray.masks import mask_image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_serve(num_cpus: int = 2):
    """A local Ray with Serve on a free port; yields `(base_url, metrics_url, temp)`. Every app
    built meanwhile keeps its sessions under `temp/data` (`FISEDIT_DATA`)."""
    import ray
    from ray import serve

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["FISEDIT_DATA"] = f"{temp}/data"
    metrics_port, port = free_port(), free_port()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", temp
    finally:
        serve.shutdown()
        ray.shutdown()
        del os.environ["FISEDIT_DATA"]
        shutil.rmtree(temp, ignore_errors=True)


def mask_png(mask) -> str:
    """A latent-resolution mask (16 x 16 for the tiny model) as base64 PNG."""
    return base64.b64encode(mask_png_bytes(mask)).decode()


def mask_png_bytes(mask) -> bytes:
    buffer = io.BytesIO()
    mask_image(torch.as_tensor(mask), 1).save(buffer, format="PNG")
    return buffer.getvalue()


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
