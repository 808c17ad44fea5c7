"""The `fisedit` command line, end to end on the embedded model."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fisedit_ray import cli
from fisedit_ray.capture import CaptureConfig
from fisedit_ray.cli import app
from fisedit_ray.models import DEFAULT_MODEL
from fisedit_ray.prompts import EMPTY_PROMPT_ERROR
from fisedit_ray.session import Session

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def mask_png(tmp_path):
    m = np.zeros((32, 32), np.uint8)
    m[8:20, 4:16] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(m).save(path)
    return path


def test_generate_then_edit_twice_continues_the_session(tmp_path, mask_png):
    session = tmp_path / "s"
    result = run("generate", "a red circle at the top left", "--session", session, "--steps", 3)
    assert result.exit_code == 0, result.output
    assert (session / "versions" / "v0" / "image.png").is_file()
    result = run("edit", "a blue circle at the top left", "--session", session, "--mask", mask_png)
    assert result.exit_code == 0, result.output
    assert "v1 (edit of v0)" in result.output
    result = run(
        "edit", "a cat", "--session", session, "--mask", mask_png, "--parent", "v0", "--mode", "dense"
    )
    assert result.exit_code == 0, result.output
    for name in ("image.png", "mask.png", "overlay.png", "version.json"):
        assert (session / "versions" / "v1" / name).is_file()
    reopened = Session.open(session)
    assert list(reopened.versions) == ["v0", "v1", "v2"]
    v1 = reopened.get("v1")
    assert v1.parent is reopened.get("v0") and v1.cache.is_delta
    assert json.loads((session / "versions" / "v1" / "version.json").read_text())["stats"]["mask_ratio"] > 0
    # the saved sparse edit is the edit the engine computes from the reloaded parent
    from fisedit_ray import EditEngine

    engine = EditEngine.from_pretrained(reopened.model)  # the default, scenes
    again = engine.edit(reopened.get("v0"), "a blue circle at the top left", mask=Image.open(mask_png))
    assert np.array_equal(np.asarray(again.latents), np.asarray(v1.latents))


def test_demo_writes_images_and_table(tmp_path):
    result = run("demo", "--out", tmp_path, "--steps", 2, "--size", 32)
    assert result.exit_code == 0, result.output
    for name in ("original.png", "edit_sparse.png", "edit_dense.png", "mask.png", "mask_overlay.png"):
        assert Image.open(tmp_path / name).size == (32, 32)
    assert "edit sparse" in result.output and "U-Net GMACs run" in result.output
    assert Image.open(tmp_path / "demo.png").width == 4 * 32 * (192 // 32)  # four tiles side by side


def test_missing_session_is_a_clear_error(tmp_path, mask_png):
    result = run("edit", "x", "--session", tmp_path / "none", "--mask", mask_png)
    assert result.exit_code == 2
    assert "no session in" in result.output


def test_corrupt_session_is_a_clear_error(tmp_path, mask_png):
    session = tmp_path / "s"
    assert run("generate", "a red circle", "--session", session, "--steps", 2).exit_code == 0
    (session / "versions" / "v0" / "version.json").write_text("{not json")
    result = run("edit", "x", "--session", session, "--mask", mask_png)
    assert result.exit_code == 2
    assert "corrupt session" in result.output


def test_bad_mask_and_parent_are_clear_errors(tmp_path, mask_png):
    session = tmp_path / "s"
    assert run("generate", "a red circle", "--session", session, "--steps", 2).exit_code == 0
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    result = run("edit", "x", "--session", session, "--mask", small)
    assert result.exit_code == 2 and "mask has shape (10, 10)" in result.output
    not_png = tmp_path / "mask.txt"
    not_png.write_text("hello")
    result = run("edit", "x", "--session", session, "--mask", not_png)
    assert result.exit_code == 2 and "cannot read mask" in result.output
    result = run("edit", "x", "--session", session, "--mask", mask_png, "--parent", "v9")
    assert result.exit_code == 2 and "no version 'v9'" in result.output
    result = run("generate", "again", "--session", session)
    assert result.exit_code == 2 and "already holds a session" in result.output
    result = run("generate", "odd size", "--session", tmp_path / "new", "--height", 33)
    assert result.exit_code == 2 and "height must be a multiple of 2" in result.output
    assert not (tmp_path / "new").exists()  # a refused generation leaves nothing behind


def fisedit(*args):
    """The command line in its own process, as a user runs it: what libraries log reaches its stderr."""
    command = [sys.executable, "-m", "fisedit_ray.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


# what the libraries under the engine used to print on every run
LIBRARY_NOISE = ("[transformers]", "torchvision", "accelerate", "indexing errors", "Loading", "it/s]")


def test_generate_and_edit_print_only_their_own_output(tmp_path, mask_png):
    session = tmp_path / "s"
    made = fisedit("generate", "a red circle at the top left", "-s", session, "--steps", 2)
    assert made.returncode == 0 and made.stderr == "", made.stderr
    assert made.stdout.splitlines()[0] == f"v0: {session / 'versions' / 'v0' / 'image.png'}"
    edited = fisedit(
        "edit", "a red circle at the top left and a blue sqare", "-s", session, "--mask", mask_png
    )
    assert edited.returncode == 0, edited.stderr
    assert edited.stdout.startswith("v1 (edit of v0): ")
    warnings = edited.stderr.splitlines()
    assert warnings and all(line.startswith("warning: ") for line in warnings), edited.stderr
    assert any("'sqare'" in line for line in warnings)
    too_long = fisedit("generate", " ".join(["red"] * 40), "-s", tmp_path / "long", "--steps", 2)
    assert too_long.returncode == 2
    assert too_long.stderr == "error: prompt is 42 tokens long; this model reads at most 32\n"
    for run_ in (made, edited, too_long):
        assert not any(noise in run_.stderr for noise in LIBRARY_NOISE), run_.stderr


def test_importing_the_command_line_loads_no_model_library():
    heavy = "{'torch', 'diffusers', 'transformers', 'fisedit_ray.engine'}"
    code = f"import sys, fisedit_ray.cli; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # what keeps --help and argument errors fast


def test_the_command_lines_defaults_are_the_librarys():
    assert cli.DEFAULT_MODEL == DEFAULT_MODEL
    assert cli.DEFAULT_DENSE_STEPS == CaptureConfig().dense_steps


@pytest.mark.parametrize("command", [[], ["generate"], ["edit"]])
def test_help_starts_with_the_prompt_grammar(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    text = result.output
    for words in ("reads only captions of this form", "COLOUR", "a red circle at the top left"):
        assert words in text
    first_panel = "Options" if not command else "Arguments"
    assert text.index("COLOUR") < text.index(first_panel)


@pytest.mark.parametrize("command", ["generate", "edit"])
def test_an_empty_prompt_is_one_error_for_generate_and_edit(tmp_path, command):
    result = run(command, "  ", "--session", tmp_path / "s")
    assert result.exit_code == 2
    assert result.stderr == f"error: {EMPTY_PROMPT_ERROR}\n"
    assert not (tmp_path / "s").exists()
