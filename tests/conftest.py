import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU in its interpreter: exact, slow
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fisedit_ray import EditEngine
from fisedit_ray.models import build_tiny_pipeline

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sd1_pipe():
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="session")
def sd2_pipe():
    return build_tiny_pipeline("sd2")


@pytest.fixture(scope="session")
def engine(sd1_pipe):
    return EditEngine.from_pipeline(sd1_pipe)


@pytest.fixture(scope="session")
def sd2_engine(sd2_pipe):
    return EditEngine.from_pipeline(sd2_pipe)
