"""The README's examples, run as written with the shipped `scenes` model.

- every ```python block, in order, in one namespace, in a temporary folder; every `Version` a block
  made by an edit must show a visible edit: a mask under half the image and an image that differs
  from its parent's; and no prompt may be outside the scenes grammar (`stats["warnings"]`);
- every `fisedit generate` / `fisedit edit` / `fisedit demo` line of the ```bash blocks, in order, as
  a subprocess in another temporary folder; an edit's printed table must show a mask under 50% and
  its image must differ from its parent's. Every other command line must be of a kind known to be
  skipped (the two setup commands, `fisedit serve`, `fisedit batch`, curl, docker, kubectl), so that
  a new example cannot go untested unnoticed;
- the README stays short, and its relative links point to files that exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200

SETUP_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . && fisedit demo",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e ".[serve,test]" '
    "&& python -m pytest -q",
)
RUN_KINDS = ("fisedit generate ", "fisedit edit ", "fisedit demo")
SKIPPED_KINDS = ("fisedit serve", "fisedit batch ", "curl ", "docker ", "kubectl ")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def command_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, blank and comment lines dropped."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def differs(a: Image.Image, b: Image.Image) -> bool:
    return bool(np.any(np.asarray(a.convert("RGB")) != np.asarray(b.convert("RGB"))))


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it at most {MAX_LINES}"


def test_readme_links_exist():
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", README.read_text())
    assert links
    missing = []
    for link in links:
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        path = link.split("#")[0]
        if not (ROOT / path).exists():
            missing.append(link)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_setup_commands():
    """The first two commands are the ones newcomers and CI run, byte for byte."""
    firsts = [command_lines(b) for b in blocks("bash")[:2]]
    assert firsts == [[SETUP_COMMANDS[0]], [SETUP_COMMANDS[1]]]


def test_readme_python_examples(tmp_path, monkeypatch):
    from fisedit_ray.engine import Version

    code = blocks("python")
    assert code, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(code):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)

    versions = [v for v in namespace.values() if isinstance(v, Version)]
    for v in versions:  # the examples stay inside the scenes model's grammar
        assert not v.stats.get("warnings"), f"{v.prompt!r}: {v.stats['warnings']}"
    edits = [v for v in versions if v.parent is not None]
    assert edits, "the python examples make no edit"
    for v in edits:
        assert v.stats["mask_ratio"] < 0.5, f"edit {v.prompt!r}: mask {v.stats['mask_ratio']:.1%}"
        assert differs(v.image, v.parent.image), f"edit {v.prompt!r} changed nothing visible"


def fisedit_command() -> list[str]:
    entry = Path(sys.executable).with_name("fisedit")
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "fisedit_ray.cli"]


def mask_ratio(stdout: str, row: str) -> float:
    """The mask column of `row` in the table `fisedit_ray.cli.report` prints."""
    match = re.search(rf"^{re.escape(row)}\s+([\d.]+)%", stdout, flags=re.M)
    assert match, f"no mask for {row!r} in:\n{stdout}"
    return float(match.group(1)) / 100


def check_edit(stdout: str, cwd: Path) -> None:
    match = re.search(r"^(\S+) \(edit of (\S+)\): (\S+)$", stdout, flags=re.M)
    assert match, stdout
    version, parent, image = match.groups()
    assert mask_ratio(stdout, version) < 0.5
    image = cwd / image
    parent_image = image.parents[1] / parent / "image.png"
    assert differs(Image.open(image), Image.open(parent_image)), "the edit changed nothing visible"


def check_demo(stdout: str, cwd: Path) -> None:
    match = re.search(r"^images in (\S+?)/?$", stdout, flags=re.M)
    assert match, stdout
    out = cwd / match.group(1)
    assert mask_ratio(stdout, "edit sparse") < 0.5
    assert differs(Image.open(out / "edit_sparse.png"), Image.open(out / "original.png"))


def test_readme_cli_examples(tmp_path):
    ran = 0
    for line in (line for block in blocks("bash") for line in command_lines(block)):
        if line in SETUP_COMMANDS or line.startswith(SKIPPED_KINDS):
            continue
        assert line.startswith(RUN_KINDS), f"a README command this test neither runs nor knows: {line!r}"
        args = shlex.split(line, comments=True)
        result = subprocess.run(
            fisedit_command() + args[1:], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        if args[1] == "edit":
            check_edit(result.stdout, tmp_path)
        elif args[1] == "demo":
            check_demo(result.stdout, tmp_path)
        ran += 1
    assert ran, "README.md has no CLI example"
