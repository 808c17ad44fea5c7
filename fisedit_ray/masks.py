"""Edit masks: user input to a latent-resolution boolean map, and its pyramid over U-Net levels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MaskLike = np.ndarray | torch.Tensor | Image.Image


def to_latent_mask(mask: MaskLike, latent_size: tuple[int, int], vae_scale: int) -> torch.Tensor:
    """A boolean `[h, w]` map at latent resolution.

    Accepts a PIL image (pixels > 127 are inside), or a boolean / 0-1 / 0-255 array, at latent
    resolution or at image resolution (reduced to latent resolution by any-pooling: a latent cell is
    inside when any of its pixels is).
    """
    h, w = latent_size
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) > 127
    else:
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.dtype != np.bool_:
            values = np.unique(arr)
            if not (np.isin(values, [0, 1]).all() or np.isin(values, [0, 255]).all()):
                raise ValueError(
                    f"mask must be binary (bool, 0/1 or 0/255), found values {values[:8].tolist()}"
                )
            arr = arr > 0
    if arr.shape == (h, w):
        return torch.from_numpy(arr.copy())
    if arr.shape == (h * vae_scale, w * vae_scale):
        pooled = arr.reshape(h, vae_scale, w, vae_scale).any(axis=(1, 3))
        return torch.from_numpy(pooled)
    raise ValueError(
        f"mask has shape {tuple(arr.shape)}; expected the latent size {(h, w)} or the image size "
        f"{(h * vae_scale, w * vae_scale)} (height, width)"
    )


@dataclass(frozen=True)
class MaskPyramid:
    """One boolean map per U-Net level (level 0 = latent); a coarse cell is active when any finer
    cell under it is (max-pooling). `cells[l]` lists the active cells of level l in row-major order;
    `rank[l][cell]` is a cell's row among them, or -1."""

    masks: tuple[torch.Tensor, ...]
    cells: tuple[torch.Tensor, ...]
    rank: tuple[torch.Tensor, ...]

    @classmethod
    def build(cls, mask: torch.Tensor, sizes: list[tuple[int, int]]) -> MaskPyramid:
        if tuple(mask.shape) != tuple(sizes[0]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match latent size {sizes[0]}")
        masks = [mask.bool()]
        for size in sizes[1:]:
            pooled = F.max_pool2d(masks[-1][None, None].float(), 2, ceil_mode=True)[0, 0] > 0
            if tuple(pooled.shape) != tuple(size):
                raise ValueError(f"level size {tuple(pooled.shape)} does not match U-Net level {size}")
            masks.append(pooled)
        cells, ranks = [], []
        for m in masks:
            flat = m.flatten()
            idx = flat.nonzero().flatten()
            rank = torch.full((flat.numel(),), -1, dtype=torch.long)
            rank[idx] = torch.arange(len(idx))
            cells.append(idx)
            ranks.append(rank)
        return cls(tuple(masks), tuple(cells), tuple(ranks))

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [tuple(m.shape) for m in self.masks]

    @property
    def ratio(self) -> float:
        return float(self.masks[0].float().mean())

    @property
    def empty(self) -> bool:
        return len(self.cells[0]) == 0

    @property
    def full(self) -> bool:
        return len(self.cells[0]) == self.masks[0].numel()

    def level_of(self, num_cells: int) -> int | None:
        for level, m in enumerate(self.masks):
            if m.numel() == num_cells:
                return level
        return None

    def to(self, device: torch.device | str) -> MaskPyramid:
        return MaskPyramid(*(tuple(t.to(device) for t in ts) for ts in (self.masks, self.cells, self.rank)))


def mask_image(mask: torch.Tensor, vae_scale: int) -> Image.Image:
    """The latent mask as a black/white PNG at image resolution."""
    arr = mask.cpu().numpy().repeat(vae_scale, 0).repeat(vae_scale, 1)
    return Image.fromarray((arr * 255).astype(np.uint8))


def overlay(image: Image.Image, mask: torch.Tensor, vae_scale: int) -> Image.Image:
    """`image` with the masked region tinted red, for people to look at."""
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    m = mask.cpu().numpy().repeat(vae_scale, 0).repeat(vae_scale, 1)[..., None]
    tinted = np.where(m, 0.5 * base + 0.5 * np.array([255.0, 0, 0]), base)
    return Image.fromarray(tinted.clip(0, 255).astype(np.uint8))


def blob_mask(size: tuple[int, int], ratio: float, seed: int = 0) -> torch.Tensor:
    """A compact random blob covering `round(ratio * h * w)` cells: the cells nearest a random centre
    under a randomly stretched, noisy distance. For tests and benchmarks."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    count = round(ratio * h * w)
    cy, cx = torch.rand(2, generator=g) * torch.tensor([h - 1, w - 1])
    sy, sx = 0.5 + torch.rand(2, generator=g)
    noise = F.avg_pool2d(torch.rand(1, 1, h, w, generator=g), 5, stride=1, padding=2, count_include_pad=False)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = ((yy - cy) / sy).square() + ((xx - cx) / sx).square()
    dist = dist * (0.75 + 0.5 * noise[0, 0])
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[dist.flatten().argsort()[:count]] = True
    return mask.reshape(h, w)
