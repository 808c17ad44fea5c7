"""The masked-dense reference: the definition of what an edit computes.

Run the ordinary dense U-Net for the edit, and after every spatial module overwrite the values outside
that module's mask level with the parent's values of the same module at the same step. The parent's
values are produced alongside, in lockstep, by running the parent the same way (recursively down to
the version that was computed densely). Nothing here reads the activation cache, so it is an
independent check of the sparse engine.
"""

from __future__ import annotations

import torch
from torch import nn

from fisedit_ray.masks import MaskPyramid
from fisedit_ray.unet_layout import spatial_leaf_modules


class LockstepHooks:
    """Forward hooks on every spatial leaf module of a U-Net.

    For each forward pass, set `replay` to the outputs recorded from the parent's pass (or None for a
    version computed densely) and `pyramid` to the version's mask pyramid; after the pass `recorded`
    holds this pass's (mixed) outputs, in call order, for the child.
    """

    def __init__(self, unet: nn.Module, sizes: list[tuple[int, int]]):
        self.sizes = [tuple(s) for s in sizes]
        self.cells = {s[0] * s[1]: level for level, s in enumerate(self.sizes)}
        self.replay: list[torch.Tensor] | None = None
        self.pyramid: MaskPyramid | None = None
        self.recorded: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for _, m in spatial_leaf_modules(unet)]

    def begin(self, replay: list[torch.Tensor] | None, pyramid: MaskPyramid | None) -> None:
        self.replay, self.pyramid, self.recorded = replay, pyramid, []

    def _level(self, out: torch.Tensor) -> int | None:
        if out.dim() == 4 and tuple(out.shape[-2:]) in self.sizes:
            return self.sizes.index(tuple(out.shape[-2:]))
        if out.dim() == 3:
            return self.cells.get(out.shape[1])
        return None

    def _hook(self, module, args, out):
        if not isinstance(out, torch.Tensor):
            return None
        level = self._level(out)
        if level is None:
            return None
        if self.replay is not None:
            parent = self.replay[len(self.recorded)]
            if parent.shape != out.shape:
                raise RuntimeError("reference lockstep lost alignment with the parent's pass")
            mask = self.pyramid.masks[level].to(out.device)
            inside = mask[None, None] if out.dim() == 4 else mask.flatten()[None, :, None]
            out = torch.where(inside, out, parent)
        self.recorded.append(out)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
