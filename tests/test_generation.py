"""Generation reproduces the diffusers pipeline, with the cache recorded on the way."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from fisedit_ray import EditEngine
from fisedit_ray.masks import blob_mask
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


def test_a_plain_generation_records_nothing_and_edits_only_densely(engine):
    recorded = engine.generate("a blue square at the center", seed=3, num_inference_steps=3)
    plain = engine.generate("a blue square at the center", seed=3, num_inference_steps=3, record=False)
    assert torch.equal(plain.latents, recorded.latents)  # recording only reads
    assert (
        plain.cache.steps == []
        and plain.stats["cache_bytes"]["total"] < recorded.stats["cache_bytes"]["total"]
    )
    everywhere = torch.ones(16, 16, dtype=torch.bool)
    dense = engine.edit(plain, "a red circle", mask=everywhere, mode="dense", record=False)
    assert torch.equal(
        dense.latents, engine.edit(recorded, "a red circle", mask=everywhere, mode="dense").latents
    )
    with pytest.raises(ValueError, match="keeps no activation cache .* edit it in dense mode"):
        engine.edit(plain, "a red circle", mask=everywhere)
    with pytest.raises(ValueError, match="keeps no activation cache"):
        engine.edit_batch([(plain, "a red circle", everywhere)])


def test_an_edit_that_records_nothing_is_the_same_edit(engine):
    """A sparse (or reference) edit with `record=False` computes the same image and keeps no cache:
    what a batch job does for edits nobody edits further."""
    parent = engine.generate("a blue square at the center", seed=4, num_inference_steps=3)
    child = engine.edit(parent, "a red circle", mask=blob_mask((16, 16), 0.2, seed=2))
    for version, mask in (
        (parent, blob_mask((16, 16), 0.2, seed=1)),
        (child, torch.ones(16, 16, dtype=torch.bool)),
    ):
        for mode in ("sparse", "reference"):
            kept = engine.edit(version, "a green square", mask=mask, mode=mode)
            plain = engine.edit(version, "a green square", mask=mask, mode=mode, record=False)
            assert torch.equal(plain.latents, kept.latents) and plain.image.tobytes() == kept.image.tobytes()
            assert plain.cache.steps == [] and plain.stats["macs_executed"] == kept.stats["macs_executed"]
            with pytest.raises(ValueError, match="keeps no activation cache"):
                engine.edit(plain, "a red square", mask=mask)
    requests = [(parent, "a green square", blob_mask((16, 16), 0.2, seed=s)) for s in (1, 3)]
    engine.edit_batch(requests)  # first: step 0 runs each edit alone, under the MAC counter
    kept, plain = engine.edit_batch(requests), engine.edit_batch(requests, record=False)
    for a, b in zip(kept, plain, strict=True):
        assert torch.equal(a.latents, b.latents) and b.cache.steps == []


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


def test_loads_a_local_diffusers_folder(sd2_pipe, tmp_path):
    sd2_pipe.save_pretrained(tmp_path / "model")
    loaded = EditEngine.from_pretrained(str(tmp_path / "model"))
    a = loaded.generate("a red circle", num_inference_steps=2, output_type="latent")
    b = EditEngine.from_pipeline(sd2_pipe).generate(
        "a red circle", num_inference_steps=2, output_type="latent"
    )
    assert torch.equal(a.latents, b.latents)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EditEngine.from_pretrained(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resnet_time_scale_shift": "scale_shift"}, "time_embedding_norm must be default"),
        ({"dual_cross_attention": True}, "DualTransformer2DModel attention is not"),
        ({"act_fn": "gelu"}, "act_fn must be silu"),
    ],
)
def test_unsupported_unets_are_refused_by_name(change, message):
    from diffusers import UNet2DConditionModel

    from fisedit_ray.models import TINY_UNET_CONFIGS

    pipe = build_tiny_pipeline("sd1")
    pipe.unet = UNet2DConditionModel(**{**TINY_UNET_CONFIGS["sd1"], **change})
    with pytest.raises(ValueError, match=message):
        EditEngine.from_pipeline(pipe)


def test_a_prompt_beyond_the_tokenizer_limit_is_refused(engine):
    limit = engine.pipe.tokenizer.model_max_length
    with pytest.raises(ValueError, match=f"reads at most {limit}"):
        engine.generate(" ".join(["red"] * (limit + 5)), num_inference_steps=1)


def test_concurrent_requests_on_one_engine_do_not_mix(engine):
    """The cache recorder hooks the shared U-Net: threads must not interleave their passes."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [("a red circle", 1), ("a blue square", 2), ("a green triangle", 3), ("a white circle", 4)]
    alone = [engine.generate(p, seed=s, num_inference_steps=2, output_type="latent") for p, s in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(
                lambda ps: engine.generate(ps[0], seed=ps[1], num_inference_steps=2, output_type="latent"),
                prompts,
            )
        )
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.latents, b.latents)
        assert a.cache.tensors().keys() == b.cache.tensors().keys()
