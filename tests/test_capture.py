"""Target Area Capture: automatic edit masks, their pieces, and their edge cases."""

from dataclasses import replace

import pytest
import torch

from fisedit_ray import EditEngine
from fisedit_ray.capture import (
    CaptureConfig,
    capture_mask,
    changed_tokens,
    combine_masks,
    dilate,
    latent_difference,
    opening,
    otsu_threshold,
)
from fisedit_ray.masks import MaskPyramid, to_latent_mask
from fisedit_ray.scenes import EditPair, Scene, SceneObject

TOL = 1e-4
STEPS = 4
PROMPT = "a red circle at the top left"
EDIT = "a red circle at the top left and a blue square at the center"
# The tiny test model has random weights: any prompt change moves every cell a little, which the
# default reads as a global edit (a full mask). Without that rule and without growth, the masks
# are partial, so that the properties below say something.
LOCAL = CaptureConfig(global_median=None, grow=1.0)


@pytest.fixture(scope="module")
def parent(engine):
    return engine.generate(PROMPT, seed=3, num_inference_steps=STEPS)


# ---- the pieces, on known inputs ----------------------------------------------------------------
def test_otsu_threshold_splits_two_modes():
    g = torch.Generator().manual_seed(0)
    low = 0.2 + 0.03 * torch.randn(900, generator=g)
    high = 0.8 + 0.03 * torch.randn(100, generator=g)
    t = otsu_threshold(torch.cat([low, high]))
    assert low.max() < t < high.min()
    assert otsu_threshold(torch.full((10,), 0.3)) == pytest.approx(0.3)


def test_capture_mask_of_a_known_region():
    score = torch.zeros(16, 16)
    score[4:9, 5:11] = 1.0  # the change
    score[3, 5:11] = 0.4  # its rim: weaker, connected
    score[13, 2] = 1.0  # a lone speck: the opening drops it
    score[14, 12:15] = 0.4  # weak and unconnected: hysteresis does not reach it
    mask = capture_mask(score, CaptureConfig())
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[3:9, 5:11] = True
    assert torch.equal(mask, expected)
    assert torch.equal(capture_mask(score, CaptureConfig(grow=1.0)), expected & (score == 1.0))
    assert torch.equal(capture_mask(score, CaptureConfig(dilation=1)), dilate(expected, 1))
    assert not capture_mask(torch.zeros(16, 16), CaptureConfig()).any()
    thin = torch.zeros(16, 16)
    thin[5, 3:9] = 1.0  # one cell wide: the opening removes it all, the mask keeps it
    assert torch.equal(capture_mask(thin, CaptureConfig()), thin > 0)


def test_a_global_change_takes_the_whole_image():
    g = torch.Generator().manual_seed(1)
    score = 0.5 + 0.1 * torch.rand(16, 16, generator=g)
    score[2:5, 2:5] = 1.0
    assert capture_mask(score, CaptureConfig()).all()
    local = capture_mask(score, CaptureConfig(global_median=None, grow=1.0))
    block = torch.zeros(16, 16, dtype=torch.bool)
    block[2:5, 2:5] = True
    assert torch.equal(local, block)


def test_latent_difference_is_the_mean_of_normalised_step_maps():
    parent = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)]
    edit = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)]
    edit[0][0, :, 1, 1] = 5.0  # scale does not matter: each step is normalised
    edit[1][0, 0, 1, 1] = -0.01
    edit[1][0, 0, 6, 6] = 0.01
    score = latent_difference(edit, parent)
    assert score[1, 1] == 1.0 and score[6, 6] == 0.5 and score.sum() == 1.5


def test_opening_drops_specks_and_keeps_blocks():
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[1:4, 1:4] = True
    m[6, 6] = True
    m[1, 5:8] = True  # a one-cell-wide line
    out = opening(m, 2)
    block = torch.zeros(8, 8, dtype=torch.bool)
    block[1:4, 1:4] = True
    assert torch.equal(out, block)


def test_changed_tokens_skip_stopwords_and_specials():
    words = {1: "a</w>", 2: "red</w>", 3: "circle</w>", 4: "blue</w>", 5: "and</w>", 6: "square</w>"}
    old = [0, 1, 2, 3, 9]  # <start> a red circle <end>
    new = [0, 1, 4, 3, 5, 1, 6, 9]  # <start> a blue circle and a square <end>
    change = changed_tokens(old, new, words)
    assert change.removed == (2,)
    assert change.added == (2, 6)
    assert changed_tokens(old, old, words).empty


def test_combine_masks():
    user = torch.tensor([[True, True], [False, False]])
    found = torch.tensor([[True, False], [True, False]])
    assert torch.equal(combine_masks(user, found, "replace"), user)
    assert torch.equal(combine_masks(user, found, "union"), torch.tensor([[True, True], [True, False]]))
    assert torch.equal(combine_masks(user, found, "intersect"), torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dense_steps": 0}, "dense_steps must be at least 1"),
        ({"threshold": 1.5}, "threshold must be 'otsu' or a number"),
        ({"grow": 0}, "grow must be in"),
        ({"combine": "xor"}, "combine must be one of"),
        ({"cross_attention": 2}, "cross_attention must be in"),
    ],
)
def test_bad_capture_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaptureConfig(**kwargs)


# ---- the engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [PROMPT, "a red circle  at the top left "])
def test_an_identical_prompt_returns_the_parent_with_an_empty_mask(engine, parent, prompt):
    edit = engine.edit(parent, prompt)
    assert not edit.mask.any() and edit.stats["capture_steps"] == 0
    assert edit.stats["macs_executed"] == 0
    assert edit.image is parent.image
    for a, b in zip(edit.cache.latents, parent.cache.latents, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", [LOCAL, replace(LOCAL, dense_steps=2, cross_attention=0.5)])
def test_an_automatic_mask_edit_keeps_the_parent_outside_and_equals_the_reference(engine, parent, config):
    sparse = engine.edit(parent, EDIT, capture=config)
    mask = sparse.mask
    assert mask.any() and not mask.all() and sparse.stats["mask_source"] == "capture"
    assert sparse.stats["capture_steps"] == config.dense_steps
    found, _ = engine.find_mask(parent, EDIT, capture=config)
    assert torch.equal(found, mask)
    for a, b in zip(sparse.cache.latents, parent.cache.latents, strict=True):
        assert torch.equal(a[..., ~mask], b[..., ~mask])  # outside the mask: the parent, exactly
    reference = engine.edit(parent, EDIT, capture=config, mode="reference")
    assert torch.equal(reference.mask, mask)
    assert (sparse.latents - reference.latents).abs().max() <= TOL
    # the dense steps that found the mask are counted in the edit's work
    per_step = parent.stats["unet_macs_per_step"]
    assert sparse.stats["capture_macs"] == config.dense_steps * per_step
    assert isinstance(sparse.pyramid, MaskPyramid) and torch.equal(sparse.pyramid.masks[0], mask)
    assert sparse.pyramid.sizes == parent.cache.sizes


def test_a_chained_automatic_edit_equals_the_reference(engine, parent):
    first = engine.edit(parent, EDIT, capture=LOCAL)
    second = engine.edit(first, EDIT + " on a gray background", capture=LOCAL)
    assert second.stats["capture_macs"] == 2 * second.stats["unet_macs_per_step"]  # both prompts probed
    assert second.mask.any() and not second.mask.all()
    reference = engine.edit(first, EDIT + " on a gray background", capture=LOCAL, mode="reference")
    assert torch.equal(second.mask, reference.mask)
    assert (second.latents - reference.latents).abs().max() <= TOL
    outside = ~second.mask
    assert torch.equal(second.latents[..., outside], first.latents[..., outside])


@pytest.mark.parametrize("config", [LOCAL, replace(LOCAL, dense_steps=2, cross_attention=0.5)])
def test_a_mask_found_without_the_cache_is_the_same_mask(engine, parent, config):
    """What the mask-generation pool computes from a parent's settings and prompt alone."""
    first = engine.edit(parent, EDIT, capture=LOCAL, output_type="latent")
    dense = engine.edit(parent, EDIT, mode="dense", output_type="latent")
    cases = [(parent, EDIT), (first, EDIT + " on a gray background"), (dense, PROMPT), (parent, PROMPT)]
    for version, prompt in cases:
        cached, how = engine.find_mask(version, prompt, capture=config)
        uncached, how_uncached = engine.find_mask_uncached(
            version.settings, version.prompt, version.mode, prompt, capture=config
        )
        assert torch.equal(uncached, cached)
        assert how_uncached["capture_steps"] == how["capture_steps"]
        # a dense-computed parent's first steps are recomputed; an edit's prompt is probed either way
        extra = 2 if version.mode in ("generate", "dense") and how["capture_steps"] else 1
        assert how_uncached["capture_macs"] == extra * how["capture_macs"]


def test_a_user_mask_wins_or_combines(engine, parent):
    user = torch.zeros(16, 16, dtype=torch.bool)
    user[:4, :4] = True
    found, _ = engine.find_mask(parent, EDIT, capture=LOCAL)
    for how, expected in (("replace", user), ("union", user | found), ("intersect", user & found)):
        config = replace(LOCAL, combine=how)
        edit = engine.edit(parent, EDIT, mask=user, capture=config, output_type="latent")
        assert torch.equal(edit.mask, expected), how
        assert edit.stats["mask_source"] == ("user" if how == "replace" else how)


def test_a_dense_edit_without_a_mask_regenerates_everything(engine, parent):
    dense = engine.edit(parent, EDIT, mode="dense", record=False)
    assert dense.mask.all() and dense.stats["capture_steps"] == 0


def test_a_batch_captures_each_mask(engine, parent):
    other = engine.generate("a green square", seed=4, num_inference_steps=STEPS, output_type="latent")
    requests = [(parent, EDIT), (other, "a green square and a red circle")]
    batch = engine.edit_batch([(p, prompt, None) for p, prompt in requests], capture=LOCAL)
    for version, (p, prompt) in zip(batch, requests, strict=True):
        alone = engine.edit(p, prompt, capture=LOCAL, output_type="latent")
        assert torch.equal(version.mask, alone.mask)
        assert (version.latents - alone.latents).abs().max() <= TOL


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("", {}, "an edit needs a non-empty prompt"),
        ("   ", {}, "an edit needs a non-empty prompt"),
        (" ".join(["red"] * 100), {}, "tokens long; this model reads at most"),
        (EDIT, {"capture": CaptureConfig(dense_steps=STEPS + 1)}, "capture needs 5 dense steps"),
        (EDIT, {"mask": torch.ones(8, 8, dtype=torch.bool)}, "mask has shape"),
        (EDIT, {"mask": torch.full((16, 16), 3)}, "mask must be binary"),
    ],
)
def test_bad_edits_are_clear_errors(engine, parent, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.edit(parent, prompt, **kwargs)


# ---- the scenes model: a known changed region ---------------------------------------------------
@pytest.fixture(scope="module")
def scenes_engine():
    return EditEngine.from_pretrained()


def changed_latents(before: Scene, after: Scene) -> torch.Tensor:
    """The cells with any changed pixel: the edit's true region at latent resolution."""
    return to_latent_mask(EditPair("edit", before, after).changed_pixels(), (32, 32), 2)


def test_the_captured_mask_covers_a_known_change(scenes_engine):
    before = Scene((SceneObject("circle", "red", 0),))
    added = Scene((SceneObject("circle", "red", 0), SceneObject("square", "blue", 8)))
    parent = scenes_engine.generate(before.caption, seed=1)
    edit = scenes_engine.edit(parent, added.caption)
    truth = changed_latents(before, added)
    assert (edit.mask & truth).sum() / truth.sum() >= 0.95  # recall
    assert not edit.mask[:11, :11].any()  # the red circle's cell is left alone
    # chained: recolouring the circle must not undo the square
    recoloured = Scene((SceneObject("circle", "green", 0), SceneObject("square", "blue", 8)))
    second = scenes_engine.edit(edit, recoloured.caption)
    truth = changed_latents(added, recoloured)
    assert (second.mask & truth).sum() / truth.sum() >= 0.95
    assert not second.mask[21:, 21:].any()
    # a new background is a global change
    background = scenes_engine.edit(parent, before.caption + " on a gray background", output_type="latent")
    assert background.mask.all()
