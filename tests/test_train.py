"""The training script runs end to end, resumes, and exports a model the engine loads."""

import json
import random

import pytest
import torch

from fisedit_ray import EditEngine
from fisedit_ray.train import TrainConfig, cpu_has_bf16, resolve, scene_batch, train


def test_train_resume_and_load(tmp_path):
    config = TrainConfig(out=str(tmp_path), max_steps=2, vae_steps=2, batch_size=2, warmup=1)
    model = train(config, log=lambda line: None)
    first = json.loads((tmp_path / "losses.json").read_text())
    assert first["steps"] == 2 and (tmp_path / "losses.png").is_file()
    config.max_steps = 3  # a larger budget on the same folder resumes, it does not restart
    train(config, log=lambda line: None)
    resumed = json.loads((tmp_path / "losses.json").read_text())
    assert resumed["steps"] == 3 and resumed["losses"][:2] == first["losses"]
    engine = EditEngine.from_pretrained(str(model))
    version = engine.generate("a red circle at the top left", num_inference_steps=2)
    assert version.image.size == (64, 64)
    assert engine.pipe.unet.dtype == torch.float32  # shipped in float16, computed in float32


def test_scene_batch_draws_object_counts_by_weight():
    images, captions = scene_batch(random.Random(0), 40, object_weights=(0, 0, 1, 0))
    assert images.shape == (40, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert all(caption.count(" at the ") == 2 for caption in captions)
    _, captions = scene_batch(random.Random(0), 40, object_weights=(1, 0, 0, 0))
    assert all(caption.startswith("an empty scene") for caption in captions)


def test_precision_choice():
    assert resolve(TrainConfig(device="cpu", precision="fp32")) == (torch.device("cpu"), None)
    assert resolve(TrainConfig(device="cpu", precision="bf16")) == (torch.device("cpu"), torch.bfloat16)
    auto = torch.bfloat16 if cpu_has_bf16() else None  # bf16 only where the CPU computes it natively
    assert resolve(TrainConfig(device="cpu")) == (torch.device("cpu"), auto)
    with pytest.raises(ValueError, match="precision must be 'bf16' or 'fp32', not 'fp16'"):
        resolve(TrainConfig(device="cpu", precision="fp16"))
