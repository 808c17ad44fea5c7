"""Sparse edits equal the masked-dense reference; the edge cases of the definition hold exactly."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from fisedit_ray import EditEngine
from fisedit_ray.masks import blob_mask
from fisedit_ray.models import SD_SCHEDULER_CONFIG, build_tiny_pipeline

TOL = 1e-4
STEPS = 4
PROMPT = "a red circle at the top left"
EDIT = "a blue square at the center"


def max_diff(a, b):
    return (a.latents - b.latents).abs().max().item()


def checkerboard(h, w):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (yy + xx) % 2 == 0


def masks(h, w):
    one = torch.zeros(h, w, dtype=torch.bool)
    one[h // 2, w // 3] = True
    border = torch.zeros(h, w, dtype=torch.bool)
    border[: h // 3, -w // 4 :] = True  # touches the top and right edges
    out = {
        "empty": torch.zeros(h, w, dtype=torch.bool),
        "full": torch.ones(h, w, dtype=torch.bool),
        "one_cell": one,
        "border": border,
        "checkerboard": checkerboard(h, w),
    }
    for i, ratio in enumerate([0.02, 0.05, 0.15, 0.30]):
        out[f"blob_{ratio:.0%}"] = blob_mask((h, w), ratio, seed=i)
    return out


@pytest.fixture(scope="module")
def parents(engine, sd2_engine):
    out = {}
    for name, eng in (("sd1", engine), ("sd2", sd2_engine)):
        for guidance in (1.0, 7.5):
            out[name, guidance] = eng.generate(
                PROMPT, seed=1, num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent"
            )
    return out


@pytest.mark.parametrize("config", ["sd1", "sd2"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("mask_name", list(masks(16, 16)))
def test_sparse_equals_reference(engine, sd2_engine, parents, config, guidance, mask_name):
    eng = engine if config == "sd1" else sd2_engine
    parent = parents[config, guidance]
    mask = masks(16, 16)[mask_name]
    sparse = eng.edit(parent, EDIT, mask=mask, mode="sparse", output_type="latent")
    reference = eng.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    assert max_diff(sparse, reference) <= TOL
    outside = ~mask
    assert torch.equal(sparse.latents[..., outside], parent.latents[..., outside])
    assert torch.equal(reference.latents[..., outside], parent.latents[..., outside])
    assert sparse.stats["mask_ratio"] == pytest.approx(mask.float().mean().item())


@pytest.mark.parametrize("mode", ["sparse", "reference"])
def test_empty_mask_returns_parent_bit_for_bit(engine, parents, mode):
    parent = parents["sd1", 7.5]
    empty = torch.zeros(16, 16, dtype=torch.bool)
    edit = engine.edit(parent, EDIT, mask=empty, mode=mode, output_type="latent")
    assert torch.equal(edit.latents, parent.latents)


def test_edit_after_an_empty_edit(engine, parents):
    parent = parents["sd1", 7.5]
    empty = engine.edit(parent, EDIT, mask=torch.zeros(16, 16, dtype=torch.bool), output_type="latent")
    mask = blob_mask((16, 16), 0.1, seed=8)
    after_empty = engine.edit(empty, "a cat", mask=mask, output_type="latent")
    direct = engine.edit(parent, "a cat", mask=mask, output_type="latent")
    assert torch.equal(after_empty.latents, direct.latents)


@pytest.mark.parametrize("config", ["sd1", "sd2"])
def test_full_mask_equals_dense(engine, sd2_engine, parents, config):
    eng = engine if config == "sd1" else sd2_engine
    parent = parents[config, 7.5]
    full = torch.ones(16, 16, dtype=torch.bool)
    dense = eng.edit(parent, EDIT, mask=full, mode="dense", output_type="latent")
    reference = eng.edit(parent, EDIT, mask=full, mode="reference", output_type="latent")
    sparse = eng.edit(parent, EDIT, mask=full, mode="sparse", output_type="latent")
    assert torch.equal(reference.latents, dense.latents)
    # a sparse edit that keeps nothing runs as the dense pass it equals: the same bits, faster
    assert torch.equal(sparse.latents, dense.latents)
    assert sparse.stats["macs_executed"] == dense.stats["macs_executed"]
    # dense mode is a regeneration with the new prompt from the same seed
    regenerated = eng.generate(EDIT, seed=1, num_inference_steps=STEPS, output_type="latent")
    assert torch.equal(dense.latents, regenerated.latents)
    # its cache is a delta holding every cell, which later edits read like any other
    assert sparse.cache.is_delta and sparse.cache.parent is parent.cache
    mask = blob_mask((16, 16), 0.15, seed=5)
    child = eng.edit(sparse, "a cat", mask=mask, output_type="latent")
    assert max_diff(child, eng.edit(dense, "a cat", mask=mask, output_type="latent")) <= TOL
    assert (
        max_diff(child, eng.edit(sparse, "a cat", mask=mask, mode="reference", output_type="latent")) <= TOL
    )


@pytest.mark.parametrize("config", ["sd1", "sd2"])
def test_two_chained_edits(engine, sd2_engine, parents, config):
    eng = engine if config == "sd1" else sd2_engine
    parent = parents[config, 7.5]
    first_mask = blob_mask((16, 16), 0.15, seed=11)
    second_mask = blob_mask((16, 16), 0.15, seed=12)
    s1 = eng.edit(parent, EDIT, mask=first_mask, output_type="latent")
    s2 = eng.edit(s1, "a green triangle at the bottom", mask=second_mask, output_type="latent")
    r1 = eng.edit(parent, EDIT, mask=first_mask, mode="reference", output_type="latent")
    r2 = eng.edit(
        r1, "a green triangle at the bottom", mask=second_mask, mode="reference", output_type="latent"
    )
    assert max_diff(s1, r1) <= TOL
    assert max_diff(s2, r2) <= TOL
    outside = ~second_mask
    assert torch.equal(s2.latents[..., outside], s1.latents[..., outside])
    # a sparse edit of a reference parent and a reference edit of a sparse parent agree too
    mixed = eng.edit(r1, "a green triangle at the bottom", mask=second_mask, output_type="latent")
    assert max_diff(mixed, r2) <= TOL
    assert s2.cache.is_delta and s2.cache.parent is s1.cache


def test_overlapping_chain_and_non_square(sd1_pipe):
    engine = EditEngine.from_pipeline(sd1_pipe)
    parent = engine.generate(PROMPT, seed=4, num_inference_steps=3, height=32, width=24, output_type="latent")
    a = torch.zeros(16, 12, dtype=torch.bool)
    a[3:9, 2:8] = True
    b = torch.zeros(16, 12, dtype=torch.bool)
    b[6:13, 5:12] = True  # overlaps `a` and touches the right edge
    s = engine.edit(
        engine.edit(parent, EDIT, mask=a, output_type="latent"), "a cat", mask=b, output_type="latent"
    )
    r1 = engine.edit(parent, EDIT, mask=a, mode="reference", output_type="latent")
    r = engine.edit(r1, "a cat", mask=b, mode="reference", output_type="latent")
    assert max_diff(s, r) <= TOL


def test_multistep_scheduler_sparse_equals_reference():
    pipe = build_tiny_pipeline("sd1", scheduler=DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG))
    engine = EditEngine.from_pipeline(pipe)
    parent = engine.generate(PROMPT, seed=2, num_inference_steps=5, output_type="latent")
    mask = blob_mask((16, 16), 0.1, seed=3)
    sparse = engine.edit(parent, EDIT, mask=mask, output_type="latent")
    reference = engine.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    assert max_diff(sparse, reference) <= TOL


def test_macs_at_five_percent_mask(engine, parents):
    parent = parents["sd1", 7.5]
    edit = engine.edit(parent, EDIT, mask=blob_mask((16, 16), 0.05, seed=5), output_type="latent")
    stats = edit.stats
    assert stats["macs_dense"] == parent.stats["macs_dense"]
    assert 0 < stats["macs_executed"] <= 0.30 * stats["macs_dense"]


def test_edit_image_keeps_parent_pixels_far_from_mask(engine):
    parent = engine.generate(PROMPT, seed=1, num_inference_steps=2)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:5, 2:5] = True
    edit = engine.edit(parent, EDIT, mask=mask)
    far = (slice(20, 32), slice(20, 32))  # pixels more than 2 latent cells away from the mask
    import numpy as np

    assert np.array_equal(np.asarray(edit.image)[far], np.asarray(parent.image)[far])
    assert edit.mask is not None and torch.equal(edit.mask, mask)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.zeros(15, 16, dtype=torch.bool), r"mask has shape \(15, 16\); expected the latent size"),
        (torch.full((16, 16), 0.5), "mask must be binary"),
    ],
)
def test_bad_masks_are_clear_errors(engine, parents, mask, message):
    with pytest.raises(ValueError, match=message):
        engine.edit(parents["sd1", 7.5], EDIT, mask=mask)


def test_bad_mode(engine, parents):
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.edit(parents["sd1", 7.5], EDIT, mask=torch.ones(16, 16, dtype=torch.bool), mode="fast")


def test_sizes_that_do_not_halve_evenly(sd2_engine):
    # latent 18x15 -> levels 18x15, 9x8, 5x4: diffusers forwards the upsample size; so must we
    parent = sd2_engine.generate(
        PROMPT, seed=5, num_inference_steps=3, height=36, width=30, output_type="latent"
    )
    assert parent.cache.sizes == [(18, 15), (9, 8), (5, 4)]
    mask = blob_mask((18, 15), 0.2, seed=1)
    sparse = sd2_engine.edit(parent, EDIT, mask=mask, output_type="latent")
    reference = sd2_engine.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    assert max_diff(sparse, reference) <= TOL


def test_a_batch_of_edits_equals_each_edit_alone(engine):
    """Different parents, prompts, masks (one empty, one full) and step counts of the chain, in one
    pass."""
    a = engine.generate("a red circle", seed=1, num_inference_steps=4, output_type="latent")
    b = engine.generate("a blue square", seed=2, num_inference_steps=4, output_type="latent")
    b1 = engine.edit(
        b, "a blue square and a cat", mask=blob_mask((16, 16), 0.1, seed=5), output_type="latent"
    )
    requests = [
        (a, "a green circle", blob_mask((16, 16), 0.2, seed=1)),
        (b1, "a white square", blob_mask((16, 16), 0.05, seed=2)),
        (a, "a yellow circle", torch.zeros(16, 16, dtype=torch.bool)),
        (b, "a purple square", blob_mask((16, 16), 0.4, seed=3)),
        (b1, "a tree", torch.ones(16, 16, dtype=torch.bool)),
    ]
    together = engine.edit_batch(requests, output_type="latent")
    for (parent, prompt, mask), batched in zip(requests, together, strict=True):
        alone = engine.edit(parent, prompt, mask=mask, output_type="latent")
        # batched GEMMs round differently: up to 1.4e-5 seen on latents of magnitude 18 (8e-7 of it)
        scale = alone.latents.abs().max().item()
        torch.testing.assert_close(batched.latents, alone.latents, rtol=0, atol=2e-6 * scale)
        assert batched.stats["macs_executed"] == alone.stats["macs_executed"]
        assert batched.stats["batch_size"] == len(requests)
        assert torch.equal(batched.latents[..., ~mask], parent.latents[..., ~mask])  # outside: the parent
        for step in range(alone.cache.num_steps):  # the caches too, to the scale of each tensor
            for key, value in alone.cache.steps[step].items():
                scale = max(1.0, value.abs().max().item())  # per-cell sums cancel: compare to the scale
                torch.testing.assert_close(
                    batched.cache.steps[step][key], value, rtol=1e-5, atol=2e-5 * scale
                )


def test_a_batch_refuses_mixed_step_counts(engine):
    a = engine.generate("a red circle", seed=1, num_inference_steps=2, output_type="latent")
    b = engine.generate("a red circle", seed=1, num_inference_steps=3, output_type="latent")
    mask = blob_mask((16, 16), 0.2, seed=1)
    with pytest.raises(ValueError, match="same number of denoising steps"):
        engine.edit_batch([(a, "x", mask), (b, "x", mask)], output_type="latent")


def test_predicted_macs_equal_counted_macs(sd1_pipe):
    """After a few counted edits of a shape the engine predicts each edit's MACs instead of counting,
    also when every mask has the same ratio (the same level-0 cell count)."""
    from fisedit_ray.macs import AffineMacs

    engine = EditEngine.from_pipeline(sd1_pipe)
    parent = engine.generate("a red circle", seed=1, num_inference_steps=2, output_type="latent")
    masks = [blob_mask((16, 16), 0.1, seed=seed) for seed in range(8)]
    masks += [blob_mask((16, 16), 0.05 + 0.05 * seed, seed=seed) for seed in range(8)]
    for k, mask in enumerate(masks):
        edit = engine.edit(parent, "a blue square", mask=mask, output_type="latent")
        counting = EditEngine.from_pipeline(sd1_pipe)  # a fresh engine counts
        counted = counting.edit(parent, "a blue square", mask=mask, output_type="latent")
        assert edit.stats["macs_executed"] == counted.stats["macs_executed"], k
    (samples,) = engine._sparse_macs.samples.values()
    assert len(samples) < len(masks) - 4  # it did switch to predicting
    model = AffineMacs()
    model.add("k", (5, 1), 10)
    model.add("k", (5, 2), 15)
    assert model.predict("k", (5, 3)) is None  # nothing has confirmed the form yet
    model.add("k", (5, 4), 25)  # n0 never changed: only n1's coefficient (5) is known ...
    assert model.predict("k", (5, 7)) == 40
    assert model.predict("k", (6, 7)) is None  # ... so a new level-0 count is counted
    model.add("k", (6, 1), 7)
    model.add("k", (6, 2), 9)  # does not fit: never predicted again
    assert model.predict("k", (5, 3)) is None and "k" in model.broken


@pytest.mark.parametrize("config", ["sd1", "sd2"])
def test_packed_weights_equal_reference_and_count_the_same_macs(sd1_pipe, sd2_pipe, monkeypatch, config):
    """The tiny models' weights are below the packing size: pack them all, as a big model's are."""
    from fisedit_ray.kernels import linear as kernels_linear

    pipe = sd1_pipe if config == "sd1" else sd2_pipe
    plain_engine = EditEngine.from_pipeline(pipe)
    parent = plain_engine.generate(PROMPT, seed=1, num_inference_steps=STEPS, output_type="latent")
    mask = blob_mask((16, 16), 0.15, seed=3)
    plain = plain_engine.edit(parent, EDIT, mask=mask, output_type="latent")
    monkeypatch.setitem(kernels_linear.PACKED_MIN_WEIGHT, torch.float32, 0)
    engine = EditEngine.from_pipeline(pipe)
    packed = engine.edit(parent, EDIT, mask=mask, output_type="latent")
    assert all(w.packed is not None for _, w in engine.sparse_unet._gemm_weights.values())
    reference = engine.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    assert max_diff(packed, reference) <= TOL
    assert torch.equal(packed.latents[..., ~mask], parent.latents[..., ~mask])
    assert packed.stats["macs_executed"] == plain.stats["macs_executed"]


def test_row_chunks_keep_the_edit(sd1_pipe, monkeypatch):
    """With temporaries capped at a few rows' worth, the feed-forwards and the group norms' per-cell
    sums run in row chunks (as a big batched pass does): the same edit, the reference's within TOL."""
    from fisedit_ray import sparse_unet
    from fisedit_ray.kernels import chunks, group_norm

    engine = EditEngine.from_pipeline(sd1_pipe)
    parent = engine.generate(PROMPT, seed=1, num_inference_steps=STEPS, output_type="latent")
    mask = blob_mask((16, 16), 0.3, seed=3)
    whole = engine.edit(parent, EDIT, mask=mask, output_type="latent")
    monkeypatch.setattr(chunks, "TEMPORARY_BYTES", 4096)
    splits = {}
    for module in (sparse_unet, group_norm):

        def counted(*args, module=module):
            parts = chunks.row_chunks(*args)
            splits[module.__name__] = max(splits.get(module.__name__, 0), len(parts))
            return parts

        monkeypatch.setattr(module, "row_chunks", counted)
    chunked = engine.edit(parent, EDIT, mask=mask, output_type="latent")
    assert min(splits.values()) > 1 and len(splits) == 2, splits  # both ran in chunks
    scale = whole.latents.abs().max().item()  # GEMMs over fewer rows round differently (as batched)
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=0, atol=2e-6 * scale)
    reference = engine.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    assert max_diff(chunked, reference) <= TOL
    assert torch.equal(chunked.latents[..., ~mask], parent.latents[..., ~mask])


def dense_above(fraction: float):
    """A cost table under which every conv of a tiny model runs dense where its output level is more
    than `fraction` active, pixel-wise elsewhere."""
    from fisedit_ray.kernels.conv_cost import ConvCosts

    shapes = [(cells, channels) for cells in (16, 64, 256) for channels in (4, 8, 16, 32, 64)]
    return ConvCosts(
        tuple(row for c, ch in shapes for row in ((c, ch, fraction, 1.0, 1.0), (c, ch, 1.0, 1.0, 2.0)))
    )


@pytest.mark.parametrize("config", ["sd1", "sd2"])
@pytest.mark.parametrize("fraction", [0.0, 0.16])
def test_convs_run_dense_equal_reference(sd1_pipe, sd2_pipe, monkeypatch, config, fraction):
    """Convs run dense where the cost table says so (all of them; or those of the levels more than 16%
    active: the 15% mask's coarser levels, 17% and 25%): the same edit as pixel-wise, counted with the
    dense convs' MACs."""
    from fisedit_ray.kernels.conv_cost import ConvCosts

    pipe = sd1_pipe if config == "sd1" else sd2_pipe
    pixel_engine = EditEngine.from_pipeline(pipe)
    parent = pixel_engine.generate(PROMPT, seed=1, num_inference_steps=STEPS, output_type="latent")
    mask = blob_mask((16, 16), 0.15, seed=3)
    pixel_wise = pixel_engine.edit(parent, EDIT, mask=mask, output_type="latent")
    monkeypatch.setattr(ConvCosts, "shipped", staticmethod(lambda device, dtype: dense_above(fraction)))
    engine = EditEngine.from_pipeline(pipe)
    dense = engine.edit(parent, EDIT, mask=mask, output_type="latent")
    signature = next(iter(engine._sparse_macs.samples))[-1]
    assert all(signature) if fraction == 0 else 0 < sum(signature) < len(signature), signature
    reference = engine.edit(parent, EDIT, mask=mask, mode="reference", output_type="latent")
    assert max_diff(dense, reference) <= TOL
    assert max_diff(dense, pixel_wise) <= TOL
    assert torch.equal(dense.latents[..., ~mask], parent.latents[..., ~mask])
    assert dense.stats["macs_executed"] > pixel_wise.stats["macs_executed"]
    for step in range(pixel_wise.cache.num_steps):  # the delta it stores: the same cells and values
        for key, value in pixel_wise.cache.steps[step].items():
            scale = max(1.0, value.abs().max().item())
            torch.testing.assert_close(dense.cache.steps[step][key], value, rtol=1e-5, atol=2e-5 * scale)


def test_a_batch_mixing_dense_and_pixel_wise_convs_equals_each_edit_alone(sd1_pipe, monkeypatch):
    """Each edit's convs run as its own mask says, batched or alone: the same values and MACs."""
    from fisedit_ray.kernels.conv_cost import ConvCosts

    monkeypatch.setattr(ConvCosts, "shipped", staticmethod(lambda device, dtype: dense_above(0.5)))
    engine = EditEngine.from_pipeline(sd1_pipe)
    parent = engine.generate(PROMPT, seed=1, num_inference_steps=STEPS, output_type="latent")
    requests = [(parent, EDIT, blob_mask((16, 16), ratio, seed=2)) for ratio in (0.05, 0.6, 0.9)]
    together = engine.edit_batch(requests, output_type="latent")
    runs_dense = [any(key[-1]) for key in engine._sparse_macs.samples]  # per edit, counted alone
    assert any(runs_dense) and not all(runs_dense), runs_dense  # the 5% edit pixel-wise, the others not
    for (_, prompt, mask), batched in zip(requests, together, strict=True):
        alone = engine.edit(parent, prompt, mask=mask, output_type="latent")
        scale = alone.latents.abs().max().item()
        torch.testing.assert_close(batched.latents, alone.latents, rtol=0, atol=2e-6 * scale)
        assert batched.stats["macs_executed"] == alone.stats["macs_executed"]
