"""Target Area Capture: the region a prompt change affects, found without a user's mask.

The engine runs the first k denoising steps densely with the new prompt from the parent's initial
noise. Where the prompt change matters, those latents drift away from the parent's cached latents
of the same steps; elsewhere they stay nearly equal. Per step the channel-summed absolute difference
is min-max normalised; the k maps are averaged into a score in [0, 1]. Cross-attention maps of the
tokens that the prompt change touched may weight the score. Then:

- threshold (Otsu's by default, or a fixed fraction of the score's range);
- morphological opening of the cells above it (drops isolated specks): the seeds (the cells above
  it themselves, if the opening leaves none: the prompt did change something);
- hysteresis: grow the seeds into connected cells above `grow` x threshold (objects' rims, which
  change less than their centres but still change);
- optional dilation;
- a global edit (a new background, a style) changes every cell a little: when the median cell's
  score reaches `global_median` of the peak, the mask is the whole image.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Combine = Literal["replace", "union", "intersect"]
COMBINE_MODES = ("replace", "union", "intersect")
# Words whose cross-attention is spread over the image: their maps say nothing about where an edit is.
STOPWORDS = frozenset({"a", "an", "the", "and", "at", "on", "of", "in", "with", "to", "is", ","})


@dataclass(frozen=True)
class CaptureConfig:
    """How an edit without a user mask finds its mask (see the module docstring)."""

    dense_steps: int = 1  # k: dense steps with the new prompt before the mask exists
    threshold: float | Literal["otsu"] = "otsu"  # or a fixed fraction of the score, in (0, 1)
    # hysteresis: seeds grow into cells above grow x threshold (1: no growth); 0.3 takes in the
    # rims a removed or moved object leaves (benchmarks/masks.py: success 97.8% vs 95.3% at 0.5)
    grow: float = 0.3
    opening: int = 2  # side of the square opening kernel, in latent cells (0 or 1: none)
    dilation: int = 0  # cells added around the mask
    global_median: float | None = 0.075  # median/peak score beyond which the edit is global
    cross_attention: float = 0.0  # weight of the changed tokens' cross-attention maps (0: unused)
    combine: Combine = "replace"  # with a user mask: it wins, or union / intersection with ours

    def __post_init__(self):
        if self.dense_steps < 1:
            raise ValueError(f"dense_steps must be at least 1, got {self.dense_steps}")
        if self.threshold != "otsu" and not (
            isinstance(self.threshold, int | float) and 0 < self.threshold < 1
        ):
            raise ValueError(f"threshold must be 'otsu' or a number in (0, 1), got {self.threshold!r}")
        if not 0 < self.grow <= 1:
            raise ValueError(f"grow must be in (0, 1], got {self.grow}")
        if self.opening < 0 or self.dilation < 0:
            raise ValueError("opening and dilation must be non-negative")
        if not 0 <= self.cross_attention <= 1:
            raise ValueError(f"cross_attention must be in [0, 1], got {self.cross_attention}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")


# ---- the score ----------------------------------------------------------------------------------
def normalise(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    x = x.float()
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def latent_difference(edit_latents: list[torch.Tensor], parent_latents: list[torch.Tensor]) -> torch.Tensor:
    """Mean over steps of the min-max normalised, channel-summed |edit - parent| `[h, w]`."""
    maps = [
        normalise((e.float() - p.float()).abs().sum(dim=1)[0])
        for e, p in zip(edit_latents, parent_latents, strict=True)
    ]
    return torch.stack(maps).mean(0)


# ---- thresholding and clean-up ------------------------------------------------------------------
def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the histogram split that maximises the between-class variance."""
    v = values.flatten().double()
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return hi
    hist = torch.histc(v, bins, lo, hi)
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = w0[-1] - w0
    m0 = (hist * centres).cumsum(0)
    mu0 = m0 / w0.clamp_min(1)
    mu1 = (m0[-1] - m0) / w1.clamp_min(1)
    between = torch.where((w0 > 0) & (w1 > 0), w0 * w1 * (mu0 - mu1) ** 2, 0.0)
    return float(centres[between.argmax()])


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Cells within `radius` (Chebyshev) of the mask."""
    if radius <= 0:
        return mask
    x = mask[None, None].float()
    return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0


def opening(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Morphological opening by a `size` x `size` square: keeps the cells of every such square
    that lies wholly inside the mask (removes specks and one-cell-wide spurs)."""
    if size <= 1:
        return mask
    x = mask[None, None].float()
    fits = -F.max_pool2d(-F.pad(x, (0, size - 1, 0, size - 1)), size, stride=1)  # square at (i, j) inside
    return F.max_pool2d(F.pad(fits, (size - 1, 0, size - 1, 0)), size, stride=1)[0, 0] > 0


def hysteresis(seeds: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The cells of `allowed` 8-connected to a seed (seeds outside `allowed` included)."""
    grown = seeds.clone()
    allowed = allowed | seeds
    while True:
        step = dilate(grown, 1) & allowed
        if torch.equal(step, grown):
            return grown
        grown = step


def capture_mask(score: torch.Tensor, config: CaptureConfig) -> torch.Tensor:
    """The boolean mask of a score map in [0, 1] (see the module docstring)."""
    if score.max() <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if config.global_median is not None and score.median() >= config.global_median * score.max():
        return torch.ones_like(score, dtype=torch.bool)
    if config.threshold == "otsu":
        threshold = otsu_threshold(score)
    else:
        threshold = float(config.threshold) * float(score.max())
    above = score > threshold
    seeds = opening(above, config.opening)
    if not seeds.any():  # a change too thin for the opening (a reshape's rim) is still a change
        seeds = above
    mask = hysteresis(seeds, score > config.grow * threshold)
    return dilate(mask, config.dilation)


def combine_masks(user: torch.Tensor, captured: torch.Tensor, how: Combine) -> torch.Tensor:
    if how == "replace":
        return user
    if how == "union":
        return user | captured
    if how == "intersect":
        return user & captured
    raise ValueError(f"combine must be one of {COMBINE_MODES}, got {how!r}")


# ---- which tokens changed -----------------------------------------------------------------------
@dataclass(frozen=True)
class TokenChange:
    """Positions of the content tokens the prompt change touched: `removed` in the old prompt
    (deleted or replaced), `added` in the new one (inserted or replacing)."""

    removed: tuple[int, ...]
    added: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return not self.removed and not self.added


def changed_tokens(old_ids: list[int], new_ids: list[int], words: dict[int, str]) -> TokenChange:
    """Align two token sequences (longest matching blocks) and keep the changed content tokens:
    special tokens and stopwords (`words` maps an id to its text) are left out."""
    removed, added = [], []
    matcher = difflib.SequenceMatcher(None, old_ids, new_ids, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op in ("replace", "delete"):
            removed += [i for i in range(i1, i2) if _content(words.get(old_ids[i]))]
        if op in ("replace", "insert"):
            added += [j for j in range(j1, j2) if _content(words.get(new_ids[j]))]
    return TokenChange(tuple(removed), tuple(added))


def _content(word: str | None) -> bool:
    if word is None:  # special tokens (start, end, padding)
        return False
    return word.removesuffix("</w>").lower() not in STOPWORDS


# ---- cross-attention maps -----------------------------------------------------------------------
@dataclass
class _Query:
    embeds: torch.Tensor  # [1, T, D] text states whose keys the queries meet
    positions: tuple[int, ...]


@dataclass
class CrossAttentionMaps:
    """Forward hooks on a U-Net's cross-attention modules (`attn2`) that record, for chosen tokens,
    how much each latent cell attends to them: softmax(q k^T) averaged over heads, summed over
    layers, upsampled to latent resolution. Queries are the conditional (text) half of the batch.

    `queries` pairs text states with token positions: the new prompt with its added tokens, and
    the old prompt with its removed ones, so the old tokens' maps are read with the edit's own
    queries (at step 0 the first layer's queries are the parent's exactly: same noise)."""

    unet: nn.Module
    sizes: list[tuple[int, int]]  # the U-Net's level sizes, latent first
    queries: list[_Query]
    steps: list[torch.Tensor] = field(default_factory=list)  # per step: [tokens, h, w]

    def __post_init__(self):
        self.latent_size = tuple(self.sizes[0])
        self._size_of = {h * w: (h, w) for h, w in self.sizes}
        self._handles = [
            m.register_forward_hook(self._hook, with_kwargs=True)
            for name, m in self.unet.named_modules()
            if name.endswith("attn2")
        ]

    def begin_step(self) -> None:
        count = sum(len(q.positions) for q in self.queries)
        self.steps.append(torch.zeros(count, *self.latent_size))

    def _hook(self, attn, args, kwargs, out):
        hidden = args[0][-1:]  # [1, HW, C]
        cells = hidden.shape[1]
        size = self._size_of[cells]
        q = attn.to_q(hidden)
        maps = []
        for query in self.queries:
            if not query.positions:
                continue
            k = attn.to_k(query.embeds.to(hidden.dtype))
            qh = q.view(1, cells, attn.heads, -1).transpose(1, 2)
            kh = k.view(1, k.shape[1], attn.heads, -1).transpose(1, 2)
            probs = (qh @ kh.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[0]  # [HW, T]
            maps.append(probs[:, list(query.positions)].T.reshape(-1, 1, *size))
        if maps:
            up = F.interpolate(torch.cat(maps).float(), size=self.latent_size, mode="bilinear")
            self.steps[-1] += up[:, 0].cpu()

    def score(self) -> torch.Tensor:
        """Per step, each token's map normalised and the tokens' maximum taken; averaged over
        steps `[h, w]` (zeros when no token changed)."""
        per_step = [
            torch.stack([normalise(m) for m in maps]).amax(0) if len(maps) else torch.zeros(self.latent_size)
            for maps in self.steps
        ]
        return torch.stack(per_step).mean(0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def attention_queries(
    new_embeds: torch.Tensor, old_embeds: torch.Tensor, change: TokenChange
) -> list[_Query]:
    """The text states and positions whose maps the capture records (conditional halves)."""
    return [_Query(new_embeds[-1:], change.added), _Query(old_embeds[-1:], change.removed)]


__all__ = [
    "COMBINE_MODES",
    "CaptureConfig",
    "CrossAttentionMaps",
    "TokenChange",
    "attention_queries",
    "capture_mask",
    "changed_tokens",
    "combine_masks",
    "latent_difference",
    "otsu_threshold",
]
