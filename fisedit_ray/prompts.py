"""Prompts the shipped scenes model understands: its caption grammar, stated for people
(`SCENES_GRAMMAR`, which `fisedit --help` shows), and warnings for a prompt outside it, each with the
nearest prompt inside it where there is one (`read_scenes_prompt`).

The scenes model was trained only on the captions of `fisedit_ray.scenes` (`Scene.caption`): any
other word is one unknown token to its tokenizer, and other wordings of known words are text it never
saw. It still draws something, but not reliably what was meant, so these are warnings, not errors.
An empty prompt is an error for every model (`check_not_empty`).

Light on purpose (the standard library and the scenes world's word lists): the command line imports
this module to show its help without loading torch.
"""

from __future__ import annotations

import difflib
import re
import textwrap
from dataclasses import dataclass, field

from fisedit_ray.scenes import (
    BACKGROUNDS,
    CELLS,
    COLORS,
    DEFAULT_BACKGROUND,
    MAX_OBJECTS,
    SHAPES,
    Scene,
    SceneObject,
    cell_tokens,
    vocabulary,
)

EMPTY_PROMPT_ERROR = "a generation or an edit needs a non-empty prompt (the description of the image)"

OTHER_BACKGROUNDS = tuple(b for b in BACKGROUNDS if b != DEFAULT_BACKGROUND)
EXAMPLES = (
    "a red circle at the top left",
    "a white square at the top and a red circle at the left on a gray background",
    "an empty scene on a brown background",
)


def _listing(name: str, words) -> str:
    """`words` after `name`, wrapped under the first of them (for a terminal of 80 columns)."""
    return textwrap.fill(
        ", ".join(words), width=76, initial_indent=f"  {name:<12}", subsequent_indent=" " * 14
    )


# Shown by `fisedit --help`, which Rich renders: line breaks are kept, square brackets would read as
# markup (so there are none).
SCENES_GRAMMAR = f"""\
The shipped model ('scenes') draws up to {MAX_OBJECTS} coloured shapes, one per cell of a
3 x 3 grid, and reads only captions of this form:

  a COLOUR SHAPE at the CELL, joined by "and", in reading order of the cells
  (top left first), then optionally "on a BACKGROUND background";
  or "an empty scene", optionally with a background.

{_listing("COLOUR", COLORS)}
{_listing("SHAPE", SHAPES)}
{_listing("CELL", CELLS)}
{_listing("BACKGROUND", OTHER_BACKGROUNDS)} (the default, {DEFAULT_BACKGROUND}, is never named)

Examples:
{chr(10).join("  " + example for example in EXAMPLES)}

Other words or wordings get a warning with the nearest prompt that fits.
Other models ('tiny', a diffusers folder) read any text."""


def check_not_empty(prompt: object) -> None:
    """Raise ValueError for a prompt that is not a string or says nothing: the same rule, and the same
    message, for generations and edits."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(EMPTY_PROMPT_ERROR)


@dataclass(frozen=True)
class PromptReading:
    """How the scenes model reads a prompt: `warnings` (empty for a caption of its grammar), the
    `nearest` prompt inside the grammar (the prompt itself when it is inside; None where no choice
    is clearly nearest, e.g. an object without a colour), and the `scene` that prompt describes."""

    warnings: list[str]
    nearest: str | None
    scene: Scene | None


def read_scenes_prompt(prompt: str) -> PromptReading:
    """Read `prompt` as the scenes model's tokenizer does, then parse it leniently into a scene: words
    fixed by spelling, objects split where a new colour or shape starts after a placed one (or at
    "and"), a missing cell put at the center (else the next free cell). Raises ValueError for an
    empty prompt."""
    check_not_empty(prompt)
    return _Parser(prompt).read()


def scenes_prompt_warnings(prompt: str) -> list[str]:
    """The warnings for `prompt` outside the scenes grammar, each ending with the nearest prompt
    inside it where there is one; empty for a caption of the grammar."""
    return read_scenes_prompt(prompt).warnings


def model_tokens(prompt: str) -> list[str]:
    """The tokens the scenes tokenizer makes of `prompt` (special tokens aside): lower case, the
    two-word cell names joined into one (see `scenes.cell_tokens`), split at spaces and punctuation."""
    text = prompt.lower()
    for name, token in cell_tokens().items():
        text = text.replace(name, token)
    return _TOKENS.findall(text)


_TOKENS = re.compile(r"\w+|[^\w\s]+")  # the tokenizer's pre-tokenizer (`pre_tokenizers.Whitespace`)
_KNOWN = frozenset(vocabulary())
_VERTICAL, _HORIZONTAL, _CENTER = ("top", "bottom"), ("left", "right"), "center"
_POSITIONS = (*_VERTICAL, *_HORIZONTAL, _CENTER)
# what a misspelling is matched against: words whose meaning a prompt carries (articles and the like
# are rewritten anyway, and matching them would read e.g. "cat" as "at")
_CONTENT = (
    *COLORS,
    *OTHER_BACKGROUNDS,
    DEFAULT_BACKGROUND,
    *SHAPES,
    *_POSITIONS,
    "background",
    "empty",
    "scene",
)
_COLOR_WORDS = (*COLORS, *BACKGROUNDS)  # an object's colour or a background's, as written
_OBJECT_WORDS = (*_COLOR_WORDS, *SHAPES, *_POSITIONS)
_SYNONYMS = {"middle": "center", "centre": "center", "grey": "gray"}
_SPELLING_CUTOFF = 0.75  # difflib ratio: "gren" -> green 0.89, "bule" -> blue 0.75, "pink" -> none


@dataclass
class _Object:
    words: list[str] = field(default_factory=list)  # as written (after spelling), for messages
    colors: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)
    placed: bool = False  # a cell followed its colour or shape: a next colour or shape is a new object

    @property
    def named(self) -> bool:
        return bool(self.colors or self.shapes or self.positions)

    def pop_tail(self) -> list[str]:
        """The function words after its last colour, shape or cell word (the next object's "a"),
        removed from its words."""
        tail = []
        while self.words and self.words[-1] not in _OBJECT_WORDS:
            tail.insert(0, self.words.pop())
        return tail

    def described(self) -> str:
        words = list(self.words)
        while words and words[-1] not in _OBJECT_WORDS:
            words.pop()
        return " ".join(words)


class _Parser:
    def __init__(self, prompt: str):
        self.tokens = model_tokens(prompt)
        self.problems: list[str] = []  # what is wrong, where the nearest prompt fixes it
        self.blockers: list[str] = []  # what is wrong, where no prompt is clearly nearest
        self.objects: list[_Object] = []
        self.background: str | None = None
        self.says_empty = False

    def read(self) -> PromptReading:
        words = self._spelled(self.tokens)
        self._segment(words)
        scene = self._scene()
        nearest = scene.caption if scene is not None and not self.blockers else None
        if nearest is not None and not self.problems and model_tokens(nearest) != self.tokens:
            self.problems.append("not worded like the captions the model was trained on")
        if nearest is not None and model_tokens(nearest) == self.tokens:
            return PromptReading([], nearest, scene)
        suffix = f'; try "{nearest}"' if nearest is not None else ""
        warnings = [problem + suffix for problem in self.problems] + self.blockers
        warnings = list(dict.fromkeys(warnings))  # e.g. one "has no shape" for many objects alike
        return PromptReading(warnings, nearest, scene if nearest is not None else None)

    def _spelled(self, tokens: list[str]) -> list[str]:
        """The tokens as grammar words: cell tokens split back into their words, misspellings and
        synonyms replaced, unknown words dropped (each with a warning)."""
        words, unknown, fixed = [], [], {}
        for token in tokens:
            if token in _KNOWN:
                words += token.split("_")
            elif token in _SYNONYMS:
                fixed[token] = _SYNONYMS[token]
                words.append(_SYNONYMS[token])
            elif match := difflib.get_close_matches(token, _CONTENT, n=1, cutoff=_SPELLING_CUTOFF):
                fixed[token] = match[0]
                words.append(match[0])
            elif token not in unknown:
                unknown.append(token)
        for wrong, right in fixed.items():
            self.problems.append(f"'{wrong}' is not a word the model knows (did you mean '{right}'?)")
        if unknown:
            listed = ", ".join(f"'{w}'" for w in unknown)
            self.problems.append(
                f"the model does not know {listed}: it reads only the words of its captions "
                "(see fisedit --help)"
            )
        return words

    def _segment(self, words: list[str]) -> None:
        """Objects, the background and "empty scene" out of the words, in any order."""
        current = _Object()
        for i, word in enumerate(words):
            after = words[i + 1] if i + 1 < len(words) else None
            if word in _COLOR_WORDS and after == "background":
                self._set_background(word)
            elif word == "background":
                if i == 0 or words[i - 1] not in _COLOR_WORDS:
                    self.blockers.append(
                        f"'background' without a colour: backgrounds are {_or(OTHER_BACKGROUNDS)}"
                    )
            elif word in ("empty", "scene"):
                self.says_empty = True
            elif word == "and":
                current = self._close(current)
            elif word in (*_COLOR_WORDS, *SHAPES):
                if (current.colors if word in _COLOR_WORDS else current.shapes) or current.placed:
                    tail = current.pop_tail()  # a new object starts, with the words before it
                    current = self._close(current)
                    current.words = tail
                (current.colors if word in _COLOR_WORDS else current.shapes).append(word)
                current.words.append(word)
            elif word in _POSITIONS:
                current.placed = current.placed or bool(current.colors or current.shapes)
                current.positions.append(word)
                current.words.append(word)
            else:  # articles, "at the", "on": kept for messages
                current.words.append(word)
        self._close(current)

    def _close(self, current: _Object) -> _Object:
        if current.named:
            self.objects.append(current)
        return _Object()

    def _set_background(self, color: str) -> None:
        if color == DEFAULT_BACKGROUND:
            self.problems.append(f"{DEFAULT_BACKGROUND} is the default background and is never named")
        elif color not in BACKGROUNDS:
            self.blockers.append(
                f"'{color}' is not a background colour: backgrounds are {_or(OTHER_BACKGROUNDS)}"
            )
        elif self.background not in (None, color):
            self.blockers.append(f"two backgrounds, {self.background} and {color}")
        else:
            self.background = color

    def _scene(self) -> Scene | None:
        """The scene the prompt describes, where every object resolves (else None, with blockers)."""
        if not self.objects and self.background is None and not self.says_empty:
            if not self.blockers:
                self.blockers.append(
                    "the prompt names no object and no background the model knows (see fisedit --help)"
                )
            return None
        if self.objects and self.says_empty:
            self.problems.append('"an empty scene" with objects in it')
        cells = [self._cell(o) for o in self.objects]
        taken = {c for c in cells if c is not None}
        resolved = []
        for o, cell in zip(self.objects, cells, strict=True):
            color, shape = self._color(o), self._shape(o)
            if cell is None and not o.positions and color and shape:
                center = CELLS.index(_CENTER)  # the center, else the next free cell in reading order
                order = [*range(center, len(CELLS)), *range(center)]
                free = [c for c in order if c not in taken]
                cell = free[0] if free else None
                if cell is not None:
                    taken.add(cell)
                    self.problems.append(f"'{o.described()}' names no cell")
            if None not in (color, shape, cell):
                resolved.append(SceneObject(shape, color, cell))
        if len(self.objects) > MAX_OBJECTS:
            self.blockers.append(
                f"{len(self.objects)} objects: the model was trained on scenes of at most {MAX_OBJECTS}"
            )
        by_cell = [o.cell for o in resolved]
        if by_cell != sorted(by_cell):
            self.problems.append("objects are named in reading order of their cells (top left first)")
        for cell in sorted({c for c in by_cell if by_cell.count(c) > 1}):
            self.blockers.append(f"two objects at the {CELLS[cell]}: a cell holds one object")
        if self.blockers or len(resolved) < len(self.objects):
            return None
        return Scene(tuple(resolved), self.background or DEFAULT_BACKGROUND)

    def _color(self, o: _Object) -> str | None:
        if not o.colors:
            self.blockers.append(f"'{o.described()}' has no colour: objects are {_or(COLORS)}")
        elif len(o.colors) > 1:
            self.blockers.append(f"'{o.described()}' has two colours")
        elif o.colors[0] not in COLORS:
            self.blockers.append(
                f"'{o.colors[0]}' is a background colour, not an object's: objects are {_or(COLORS)}"
            )
        else:
            return o.colors[0]
        return None

    def _shape(self, o: _Object) -> str | None:
        if not o.shapes:
            self.blockers.append(f"'{o.described()}' has no shape: shapes are {_or(SHAPES)}")
        elif len(o.shapes) > 1:
            self.blockers.append(f"'{o.described()}' has two shapes")
        else:
            return o.shapes[0]
        return None

    def _cell(self, o: _Object) -> int | None:
        """The cell the object's position words name ("top left", "left top" and "top center" read
        as they say); None for none or a contradiction (a blocker)."""
        vertical = list(dict.fromkeys(p for p in o.positions if p in _VERTICAL))
        horizontal = list(dict.fromkeys(p for p in o.positions if p in _HORIZONTAL))
        if len(vertical) > 1 or len(horizontal) > 1:
            self.blockers.append(f"'{o.described()}' names two cells: cells are {_or(CELLS)}")
            return None
        name = " ".join(vertical + horizontal) or (_CENTER if _CENTER in o.positions else None)
        return None if name is None else CELLS.index(name)


def _or(words) -> str:
    words = list(words)
    return ", ".join(words[:-1]) + f" or {words[-1]}"
