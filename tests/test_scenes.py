"""The synthetic scenes world: captions, edit pairs with their ground truth, and the detector."""

import numpy as np
import pytest

from fisedit_ray.detector import cells_correct, detect
from fisedit_ray.models import build_tokenizer
from fisedit_ray.scenes import (
    CELLS,
    EDIT_KINDS,
    Scene,
    SceneObject,
    cell_tokens,
    random_edit,
    random_scene,
    render_batch,
    vocabulary,
)


def test_caption_grammar_reads_cells_in_order():
    scene = Scene(
        (SceneObject("square", "blue", 4), SceneObject("circle", "red", 0)),
        background="gray",
    )
    assert (
        scene.caption == "a red circle at the top left and a blue square at the center on a gray background"
    )
    assert Scene().caption == "an empty scene"


def test_tokenizer_reads_every_caption_with_one_token_per_cell():
    tokenizer = build_tokenizer(32, vocabulary(), cell_tokens())
    ids = tokenizer([random_scene(s).caption for s in range(300)]).input_ids
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    words = tokenizer.convert_ids_to_tokens(tokenizer("a red circle at the bottom left").input_ids)
    assert words[-2:] == ["bottom_left", tokenizer.eos_token]
    cells = [tokenizer(f"at the {name}").input_ids for name in CELLS]
    assert {len(ids) for ids in cells} == {5} and len({ids[3] for ids in cells}) == 9


def test_scenes_are_deterministic_and_varied():
    assert random_scene(3) == random_scene(3)
    assert np.array_equal(np.asarray(random_scene(3).render()), np.asarray(random_scene(3).render()))
    counts = {len(random_scene(s).objects) for s in range(100)}
    assert counts == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="two objects in one cell"):
        Scene((SceneObject("square", "blue", 4), SceneObject("circle", "red", 4)))


def test_detector_reads_dataset_images():
    correct = [
        ok for s in range(1000) for ok in cells_correct(detect(random_scene(s).render()), random_scene(s))
    ]
    assert np.mean(correct) >= 0.99
    backgrounds = [
        detect(random_scene(s).render()).background == random_scene(s).background for s in range(300)
    ]
    assert np.mean(backgrounds) >= 0.99


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_pairs_change_what_they_say(kind):
    scene = random_scene(11, min_objects=2, max_objects=3)
    pair = random_edit(scene, kind, seed=1)
    changed = pair.changed_pixels()
    assert changed.any()
    if kind == "background":
        assert pair.changed_cells == () and changed.mean() > 0.5
    else:
        # every changed pixel lies in a changed cell, and the other cells' objects are untouched
        ys, xs = np.nonzero(changed)
        cells = {(y * 3 // 64) * 3 + (x * 3 // 64) for y, x in zip(ys, xs, strict=True)}
        assert cells <= set(pair.changed_cells)
        for cell in set(range(9)) - set(pair.changed_cells):
            assert pair.before.object_at(cell) == pair.after.object_at(cell)
    assert pair.before.caption != pair.after.caption


def test_impossible_edits_are_refused():
    with pytest.raises(ValueError, match="cannot remove in an empty scene"):
        random_edit(Scene(), "remove", seed=0)
    full = Scene(tuple(SceneObject("circle", "red", c) for c in range(9)))
    with pytest.raises(ValueError, match="no empty cell"):
        random_edit(full, "add", seed=0)


def test_batched_rendering_equals_one_at_a_time():
    scenes = [random_scene(s) for s in range(200)] + [Scene()]
    batch = render_batch(scenes).permute(0, 2, 3, 1).numpy()
    assert batch.dtype == np.uint8
    assert np.array_equal(batch, np.stack([np.asarray(s.render()) for s in scenes]))
