"""A deterministic detector for the scenes world: background colour, and the object in each cell.

No learned model: colours are matched to the palette, shapes to the rendered templates by overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from fisedit_ray.scenes import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    OBJECT_RADIUS,
    SHAPES,
    Scene,
    cell_center,
    shape_mask,
)

MARGIN = 2  # pixels around an object's box that still belong to its cell's window
MIN_OBJECT_SHARE = 0.25  # of the smallest shape's area, below which a cell reads as empty
OBJECT_DISTANCE = 60.0  # RGB distance from the background that makes a pixel part of an object


@dataclass(frozen=True)
class Detection:
    background: str
    objects: dict[int, tuple[str, str]]  # cell -> (colour, shape)

    def cell(self, cell: int) -> tuple[str, str] | None:
        return self.objects.get(cell)


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(colour - np.array(palette[n], dtype=float)) for n in names]
    return names[int(np.argmin(distances))]


def _windows(size: int) -> list[tuple[slice, slice]]:
    r = OBJECT_RADIUS + MARGIN
    out = []
    for cell in range(9):
        x, y = cell_center(cell, size)
        out.append((slice(int(y - r), int(np.ceil(y + r)) + 1), slice(int(x - r), int(np.ceil(x + r)) + 1)))
    return out


_TEMPLATES = {shape: [shape_mask(shape, cell) for cell in range(9)] for shape in SHAPES}
_WINDOWS = _windows(IMAGE_SIZE)
_MIN_PIXELS = MIN_OBJECT_SHARE * min(int(t[4].sum()) for t in _TEMPLATES.values())


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Read a scene image (any size; compared at 64 x 64)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    pixels = np.asarray(image.convert("RGB")).astype(float)
    gutter = np.ones(pixels.shape[:2], dtype=bool)
    for rows, cols in _WINDOWS:
        gutter[rows, cols] = False
    background_colour = np.median(pixels[gutter], axis=0)
    background = _nearest(background_colour, BACKGROUNDS)
    foreground = np.linalg.norm(pixels - background_colour, axis=-1) > OBJECT_DISTANCE
    objects = {}
    for cell, (rows, cols) in enumerate(_WINDOWS):
        window = np.zeros_like(foreground)
        window[rows, cols] = foreground[rows, cols]
        if window.sum() < _MIN_PIXELS:
            continue
        colour = _nearest(np.median(pixels[window], axis=0), COLORS)
        overlaps = {}
        for shape in SHAPES:
            template = _TEMPLATES[shape][cell]
            overlaps[shape] = (window & template).sum() / (window | template).sum()
        objects[cell] = (colour, max(overlaps, key=overlaps.get))
    return Detection(background, objects)


def cells_correct(detection: Detection, scene: Scene) -> list[bool]:
    """Per cell: does the detection agree with the scene (object colour and shape, or emptiness)?"""
    truth = {o.cell: (o.color, o.shape) for o in scene.objects}
    return [detection.cell(c) == truth.get(c) for c in range(9)]
