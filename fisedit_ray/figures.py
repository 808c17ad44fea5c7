"""Pictures a person would rather look at than read: labelled image grids (demo, benchmarks)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw

LINE_HEIGHT = 12


def labeled_grid(
    tiles: Sequence[tuple[Image.Image, str]], columns: int, scale: int = 3, label_lines: int = 2
) -> Image.Image:
    """Images upscaled `scale` times (nearest, so pixels stay visible) in a grid, each above its label,
    wrapped to the tile's width."""
    if not tiles:
        raise ValueError("no images to lay out")
    width, height = (side * scale for side in tiles[0][0].size)
    cell_h = height + 4 + label_lines * LINE_HEIGHT
    rows = -(-len(tiles) // columns)
    canvas = Image.new("RGB", (columns * width, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    chars = max(8, width // 6)  # the default bitmap font is 6 px wide
    for i, (image, label) in enumerate(tiles):
        x, y = (i % columns) * width, (i // columns) * cell_h
        canvas.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(label, chars)[:label_lines]):
            draw.text((x + 2, y + height + 2 + j * LINE_HEIGHT), line, fill="black")
    return canvas
