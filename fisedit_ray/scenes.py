"""A synthetic world where the truth is known: shapes on a 3x3 grid, their captions, and edit pairs.

Every scene is drawn deterministically from a seed. Its caption follows one fixed grammar, e.g.
`a red circle at the top left and a blue square at the center on a gray background`, objects in
reading order of their cells; the default (black) background is not mentioned.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import torch

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "orange": (200, 110, 30),
    "brown": (110, 70, 40),
}
DEFAULT_BACKGROUND = "black"
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
EDIT_KINDS = ("add", "remove", "recolor", "reshape", "move", "background")
MAX_OBJECTS = 3  # the most objects a scene holds (the shipped model saw scenes of 0 to 3)
IMAGE_SIZE = 64
OBJECT_RADIUS = 7  # pixels; cells are 64 / 3 ~ 21 px wide


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: int  # index into CELLS, reading order

    def phrase(self) -> str:
        return f"a {self.color} {self.shape} at the {CELLS[self.cell]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...] = ()
    background: str = DEFAULT_BACKGROUND

    def __post_init__(self):
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError("two objects in one cell")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))

    @property
    def caption(self) -> str:
        text = " and ".join(o.phrase() for o in self.objects) or "an empty scene"
        if self.background != DEFAULT_BACKGROUND:
            text += f" on a {self.background} background"
        return text

    def object_at(self, cell: int) -> SceneObject | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def render(self, size: int = IMAGE_SIZE) -> Image.Image:
        image = Image.new("RGB", (size, size), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        for o in self.objects:
            draw_shape(
                draw, o.shape, cell_center(o.cell, size), OBJECT_RADIUS * size / IMAGE_SIZE, COLORS[o.color]
            )
        return image

    def object_masks(self, size: int = IMAGE_SIZE) -> dict[int, np.ndarray]:
        """Pixel mask of every object, by cell."""
        return {o.cell: shape_mask(o.shape, o.cell, size) for o in self.objects}


def cell_center(cell: int, size: int = IMAGE_SIZE) -> tuple[float, float]:
    row, col = divmod(cell, 3)
    return ((col + 0.5) * size / 3, (row + 0.5) * size / 3)


def cell_window(cell: int, size: int = IMAGE_SIZE) -> tuple[slice, slice]:
    """The pixel rows and columns of a grid cell (size // 3 pixels square, from the top left)."""
    side = size // 3
    row, col = divmod(cell, 3)
    return slice(row * side, (row + 1) * side), slice(col * side, (col + 1) * side)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center, radius: float, fill) -> None:
    x, y = center
    r = radius
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # about the circle's area
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def shape_mask(shape: str, cell: int, size: int = IMAGE_SIZE) -> np.ndarray:
    image = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(image), shape, cell_center(cell, size), OBJECT_RADIUS * size / IMAGE_SIZE, 255)
    return np.asarray(image) > 0


@functools.cache
def _shape_masks(size: int) -> torch.Tensor:
    """[shape, cell, size, size] pixel masks: every object this world can draw."""
    import torch  # here, not above: the command line reads this module's word lists at start-up

    return torch.from_numpy(np.stack([[shape_mask(s, c, size) for c in range(9)] for s in SHAPES]))


def render_batch(scenes: Sequence[Scene], size: int = IMAGE_SIZE, device="cpu") -> torch.Tensor:
    """[B, 3, size, size] uint8 images, equal to `Scene.render` but vectorised (on any device):
    objects never overlap, so an image is its background plus each object's mask times its colour
    change. For training, where rendering one scene at a time cannot keep a GPU busy."""
    import torch

    palette = torch.tensor([*COLORS.values(), *BACKGROUNDS.values()], dtype=torch.int32, device=device)
    color_index = {name: i for i, name in enumerate([*COLORS, *BACKGROUNDS])}
    shape_index = {name: i for i, name in enumerate(SHAPES)}
    objects = [
        (b, shape_index[o.shape], o.cell, color_index[o.color])
        for b, sc in enumerate(scenes)
        for o in sc.objects
    ]
    background = palette[[color_index[sc.background] for sc in scenes]]  # [B, 3]
    images = background[:, :, None, None].expand(-1, -1, size, size).clone()
    if objects:
        scene, shape, cell, color = torch.tensor(objects, device=device).T
        masks = _shape_masks(size).to(device)[shape, cell]  # [N, size, size]
        change = palette[color] - background[scene]  # [N, 3]
        images.index_add_(0, scene, masks[:, None].int() * change[:, :, None, None])
    return images.to(torch.uint8)


def random_scene(
    seed: int, min_objects: int = 0, max_objects: int = MAX_OBJECTS, background_p: float = 0.2
) -> Scene:
    rng = random.Random(seed)
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(9), count)
    objects = tuple(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), c) for c in cells)
    background = DEFAULT_BACKGROUND
    if rng.random() < background_p:
        background = rng.choice([b for b in BACKGROUNDS if b != DEFAULT_BACKGROUND])
    return Scene(objects, background)


@dataclass(frozen=True)
class EditPair:
    kind: str
    before: Scene
    after: Scene
    changed_cells: tuple[int, ...] = field(default=())  # empty for a global edit

    def changed_pixels(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """Ground truth: the pixels whose rendering differs."""
        a = np.asarray(self.before.render(size)).astype(int)
        b = np.asarray(self.after.render(size)).astype(int)
        return (a != b).any(axis=-1)


def random_edit(scene: Scene, kind: str, seed: int) -> EditPair:
    """Apply one edit of `kind` to `scene`; raises ValueError where the scene does not allow it."""
    rng = random.Random(seed)
    objects = list(scene.objects)
    empty = [c for c in range(9) if scene.object_at(c) is None]
    if kind in ("remove", "recolor", "reshape", "move") and not objects:
        raise ValueError(f"cannot {kind} in an empty scene")
    if kind in ("add", "move") and not empty:
        raise ValueError(f"cannot {kind}: no empty cell")
    if kind == "add":
        new = SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(empty))
        return EditPair(kind, scene, replace(scene, objects=(*objects, new)), (new.cell,))
    if kind == "background":
        background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        return EditPair(kind, scene, replace(scene, background=background))
    target = rng.choice(objects)
    rest = [o for o in objects if o is not target]
    if kind == "remove":
        return EditPair(kind, scene, replace(scene, objects=tuple(rest)), (target.cell,))
    if kind == "recolor":
        changed = replace(target, color=rng.choice([c for c in COLORS if c != target.color]))
    elif kind == "reshape":
        changed = replace(target, shape=rng.choice([s for s in SHAPES if s != target.shape]))
    elif kind == "move":
        changed = replace(target, cell=rng.choice(empty))
    else:
        raise ValueError(f"unknown edit kind {kind!r}; kinds are {EDIT_KINDS}")
    cells = tuple(sorted({target.cell, changed.cell}))
    return EditPair(kind, scene, replace(scene, objects=(*rest, changed)), cells)


def cell_tokens() -> dict[str, str]:
    """The two-word cell names, each read as one token. Word by word, "bottom" alone (the bottom
    centre) and the first word of "bottom left" are the same token to a causal text encoder; a model
    trained that way put the objects of those cells in the wrong column a third of the time."""
    return {c: c.replace(" ", "_") for c in CELLS if " " in c}


def vocabulary() -> list[str]:
    """Every token of the grammar (new tokens go last, so a trained text encoder's ids stay valid)."""
    words = ["a", "an", "at", "the", "and", "on", "background", "empty", "scene"]
    words += list(COLORS) + list(BACKGROUNDS) + list(SHAPES)
    words += sorted({w for c in CELLS for w in c.split()})
    words += cell_tokens().values()
    return list(dict.fromkeys(words))
