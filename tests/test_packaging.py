"""The package imports cleanly however it is run."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_from_the_repository_root():
    # The repository root is on the path; nothing there may shadow a package that diffusers or
    # transformers import (Hugging Face's `kernels`, which they probe for and then import from).
    code = (
        "from transformers import CLIPTextModel\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from fisedit_ray import EditEngine\n"
        "import fisedit_ray.kernels.conv as conv\n"
        "print(conv.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("fisedit_ray.kernels.conv")
