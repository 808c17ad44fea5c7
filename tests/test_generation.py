"""Generation reproduces the diffusers pipeline, with the cache recorded on the way."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from fisedit_ray import EditEngine
from fisedit_ray.models import SD_SCHEDULER_CONFIG, build_tiny_pipeline

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD_SCHEDULER_CONFIG),
    "dpm_multistep": lambda: DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG),
    "euler": lambda: EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG),
    "pndm": lambda: PNDMScheduler.from_config(SD_SCHEDULER_CONFIG, skip_prk_steps=True),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("size", [(32, 32), (32, 24)])
def test_generation_equals_diffusers(scheduler, guidance, size):
    pipe = build_tiny_pipeline("sd1", scheduler=SCHEDULERS[scheduler]())
    engine = EditEngine.from_pipeline(pipe)
    height, width = size
    prompt = "a red circle at the top left"
    version = engine.generate(
        prompt,
        seed=7,
        num_inference_steps=4,
        guidance_scale=guidance,
        height=height,
        width=width,
        output_type="latent",
    )
    expected = pipe(
        prompt,
        num_inference_steps=4,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="latent",
    ).images
    assert version.latents.shape == (1, 4, height // 2, width // 2)
    assert (version.latents - expected).abs().max().item() <= 1e-5
    assert version.image is None
    assert version.cache.num_steps == len(pipe.scheduler.timesteps)  # PNDM: one more than asked
    batch = 2 if guidance > 1 else 1
    first = next(t for k, t in version.cache.steps[0].items() if not k.endswith(":stats"))
    assert first.shape[0] == batch


def test_generate_returns_image_and_stats(engine):
    version = engine.generate("a blue square at the center", num_inference_steps=2)
    assert version.image.size == (32, 32)
    stats = version.stats
    assert stats["macs_executed"] == stats["macs_dense"] == 2 * stats["unet_macs_per_step"] > 0
    assert set(stats["seconds"]) >= {"text_encode", "dense_steps", "decode", "total"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 33}, "height must be a multiple of 2"),
        ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
        ({"output_type": "np"}, "output_type must be"),
    ],
)
def test_generate_rejects_bad_arguments(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate("a red circle", **kwargs)
