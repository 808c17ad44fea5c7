"""Prompts the scenes model understands: warnings with the nearest valid prompt, none for its captions
or for other models, and one empty-prompt rule for generations and edits."""

import re

import pytest
import torch

from fisedit_ray import EditEngine
from fisedit_ray.cli import DEMO_EDIT, DEMO_PROMPT
from fisedit_ray.models import build_tiny_pipeline, build_tokenizer
from fisedit_ray.prompts import (
    EMPTY_PROMPT_ERROR,
    EXAMPLES,
    SCENES_GRAMMAR,
    model_tokens,
    read_scenes_prompt,
    scenes_prompt_warnings,
)
from fisedit_ray.scenes import BACKGROUNDS, CELLS, COLORS, SHAPES, cell_tokens, random_scene, vocabulary


def test_every_caption_of_the_world_reads_back_as_its_scene_without_warnings():
    for seed in range(2000):
        scene = random_scene(seed)
        reading = read_scenes_prompt(scene.caption)
        assert reading.warnings == [], scene.caption
        assert reading.scene == scene and reading.nearest == scene.caption
    for prompt in (
        "A Red Circle at the top left",
        "  a red circle   at the top left ",
        DEMO_PROMPT,
        DEMO_EDIT,
    ):
        assert scenes_prompt_warnings(prompt) == [], prompt  # the tokenizer reads these as a caption


# (prompt, words the one warning must hold, nearest valid prompt)
FIXABLE = [
    ("a green circle", "names no cell", "a green circle at the center"),
    ("a gren circle at the top left", "'gren'", "a green circle at the top left"),
    ("a red sqare at the bottom", "'sqare'", "a red square at the bottom"),
    ("a blue trinagle at the right", "'trinagle'", "a blue triangle at the right"),
    ("a red circle at the middle", "'middle'", "a red circle at the center"),
    ("a big red circle at the top left", "'big'", "a red circle at the top left"),
    ("a red circle at the top left.", "'.'", "a red circle at the top left"),
    (
        "a blue square at the center and a red circle at the top left",
        "reading order",
        "a red circle at the top left and a blue square at the center",
    ),
    ("a red circle at the center on a black background", "default background", "a red circle at the center"),
    ("red circle at top left", "not worded like the captions", "a red circle at the top left"),
    ("on a gray background", "not worded like the captions", "an empty scene on a gray background"),
]


@pytest.mark.parametrize("prompt, says, nearest", FIXABLE, ids=[p for p, _, _ in FIXABLE])
def test_a_prompt_outside_the_grammar_gets_a_warning_with_the_nearest_valid_prompt(prompt, says, nearest):
    reading = read_scenes_prompt(prompt)
    assert reading.nearest == nearest
    assert len(reading.warnings) == 1 and says in reading.warnings[0]
    assert reading.warnings[0].endswith(f'try "{nearest}"')
    assert scenes_prompt_warnings(nearest) == []  # what it suggests is inside the grammar


def test_objects_without_cells_go_to_free_cells_in_the_order_written():
    reading = read_scenes_prompt("a red circle and a blue square")
    assert reading.nearest == "a red circle at the center and a blue square at the right"
    reading = read_scenes_prompt("a red circle at the center and a blue square")
    assert reading.nearest == "a red circle at the center and a blue square at the right"


# (prompt, words a warning must hold): no prompt is clearly nearest, so none is suggested
UNFIXABLE = [
    ("a circle at the top", "has no colour"),
    ("a red thing at the top", "has no shape"),
    ("a gray circle at the top", "is a background colour"),
    ("a red circle at the top on a red background", "'red' is not a background colour"),
    ("a red circle at the top left and a blue square at the top left", "two objects at the top left"),
    (" and ".join(f"a red circle at the {cell}" for cell in CELLS[:4]), "at most 3"),
    ("a cat", "'cat'"),
]


@pytest.mark.parametrize("prompt, says", UNFIXABLE, ids=[p for p, _ in UNFIXABLE])
def test_a_prompt_with_no_clear_nearest_gets_warnings_without_a_suggestion(prompt, says):
    reading = read_scenes_prompt(prompt)
    assert reading.nearest is None and reading.scene is None
    assert any(says in w for w in reading.warnings), reading.warnings
    assert not any("try" in w for w in reading.warnings)


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_an_empty_prompt_is_an_error_not_a_warning(prompt):
    with pytest.raises(ValueError, match=re.escape(EMPTY_PROMPT_ERROR)):
        scenes_prompt_warnings(prompt)


def test_prompts_are_read_as_the_scenes_tokenizer_reads_them():
    tokenizer = build_tokenizer(32, vocabulary(), cell_tokens())
    prompts = [
        "A red circle at the top left, and a blue square!",
        "a red circle at the top  left",
        "at the bottom right: a green-ish triangle",
    ]
    for prompt in prompts:
        words = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)[1:-1]
        known = [w if w in vocabulary() else tokenizer.unk_token for w in model_tokens(prompt)]
        assert words == known, prompt


def test_the_grammar_text_names_every_word_and_its_examples_are_valid():
    for word in (*COLORS, *SHAPES, *CELLS, *(b for b in BACKGROUNDS if b != "black")):
        assert word in SCENES_GRAMMAR
    for example in EXAMPLES:
        assert example in SCENES_GRAMMAR and scenes_prompt_warnings(example) == []
    assert "[" not in SCENES_GRAMMAR  # Rich, which renders --help, would read it as markup


# ---- the engine -----------------------------------------------------------------------------------
QUICK = dict(num_inference_steps=2, output_type="latent")


@pytest.fixture(scope="module")
def scenes_engine():
    return EditEngine.from_pretrained()


@pytest.fixture(scope="module")
def scenes_parent(scenes_engine):
    return scenes_engine.generate("a red circle at the top left", **QUICK)


@pytest.fixture(scope="module")
def corner():
    """A latent mask, so that edits skip finding one."""
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:10, :10] = True
    return mask


def test_the_engine_knows_the_scenes_model(scenes_engine, engine):
    assert scenes_engine.is_scenes_model and not engine.is_scenes_model
    assert scenes_engine.prompt_warnings("a gren circle") == scenes_prompt_warnings("a gren circle")
    assert engine.prompt_warnings("a gren circle") == []  # the tiny model reads any text


def test_versions_carry_their_prompts_warnings(scenes_engine, scenes_parent, corner):
    assert scenes_parent.stats["warnings"] == []
    odd = scenes_engine.generate("a red circle", **QUICK)
    assert odd.stats["warnings"] == scenes_prompt_warnings("a red circle") and odd.stats["warnings"]
    prompt = "a blue sqare at the top left"
    edited = scenes_engine.edit(scenes_parent, prompt, mask=corner, output_type="latent")
    assert edited.stats["warnings"] == scenes_prompt_warnings(prompt)
    assert any("'sqare'" in w for w in edited.stats["warnings"])
    batch = scenes_engine.edit_batch(
        [(scenes_parent, "a blue circle at the top left", corner), (scenes_parent, "a blue circle", corner)],
        output_type="latent",
    )
    assert batch[0].stats["warnings"] == [] and batch[1].stats["warnings"]


def test_versions_of_other_models_have_no_warnings(engine):
    version = engine.generate("a photo of a cat", **QUICK)
    assert version.stats["warnings"] == []
    edited = engine.edit(version, "a photo of a dog", output_type="latent", mode="dense")
    assert edited.stats["warnings"] == []


@pytest.mark.parametrize("model", ["scenes", "tiny"])
@pytest.mark.parametrize("prompt", ["", "  "])
def test_generate_and_edit_refuse_an_empty_prompt_alike(request, model, prompt, corner):
    if model == "scenes":
        engine, parent = request.getfixturevalue("scenes_engine"), request.getfixturevalue("scenes_parent")
    else:
        engine = request.getfixturevalue("engine")
        parent = engine.generate("a red circle at the top left", **QUICK)
    calls = [
        lambda: engine.generate(prompt, **QUICK),
        lambda: engine.edit(parent, prompt, mask=corner),
        lambda: engine.edit_batch([(parent, prompt, corner)]),
        lambda: engine.prompt_warnings(prompt),
    ]
    for call in calls:
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == EMPTY_PROMPT_ERROR


def test_warm_up_generates_with_a_prompt():
    compiling = EditEngine.from_pipeline(build_tiny_pipeline("sd1"), compile=True)
    assert compiling.warm_up([], height=32, width=32) > 0  # it generated from "", which is now refused
