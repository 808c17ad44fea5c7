"""Sparse execution of a diffusers U-Net: every layer computes only the active cells of its level.

It walks the same modules, with the same weights, in the same order as `UNet2DConditionModel.forward`,
on token-major values of the active cells. Inputs outside the mask come from the parent's cache:
- a conv reads its halo (inactive neighbours of active outputs) from the cached input, passed through
  the parent's own group norm and SiLU where the conv follows one;
- a group norm uses the exact statistics of the mixed map: the parent's sums, minus the parent's
  active cells, plus the new active cells (a transformer's norm reads per-cell sums: no conv reads
  its output, so the cache keeps no values of it);
- self-attention takes queries from active tokens, keys/values fresh inside and cached outside;
- everything per token (projections, cross-attention, feed-forward, norms) runs on active tokens.
What an edit must store for its own children (its delta) is recorded on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from fisedit_ray.cache import STATS, ActivationCache, CacheReader
from fisedit_ray.kernels.attention import active_query_attention
from fisedit_ray.kernels.conv import conv_matrix, sparse_conv2d
from fisedit_ray.kernels.gather import conv_input_positions, gather_plan
from fisedit_ray.kernels.group_norm import cell_sums, group_norm_act, group_stats, group_sums, sum_cells
from fisedit_ray.masks import MaskPyramid
from fisedit_ray.unet_layout import NORM_CELL_SUMS, level_sizes, tokens, validate_unet


@dataclass
class Active:
    """Values `[B, N, C]` at the active cells of one level."""

    values: torch.Tensor
    level: int


class GatherPlans:
    """Index plans of one mask pyramid, built once per edit and reused at every step."""

    def __init__(self, pyramid: MaskPyramid, device: torch.device):
        self.pyramid = pyramid.to(device)
        self.device = device
        self._plans: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def conv(self, conv: nn.Conv2d, in_level: int, out_level: int, upsampled: bool):
        key = (conv.kernel_size, conv.stride, conv.padding, in_level, out_level, upsampled)
        if key not in self._plans:
            p = self.pyramid
            out_size = p.sizes[out_level]
            grid = out_size if upsampled else p.sizes[in_level]
            positions = conv_input_positions(
                p.cells[out_level], out_size[1], grid, conv.kernel_size[0], conv.stride[0], conv.padding[0]
            )
            if upsampled:  # the conv reads a nearest-upsampled map: map its cells to the coarse ones
                coarse = p.sizes[in_level]
                ids = torch.arange(coarse[0] * coarse[1], dtype=torch.float32).reshape(1, 1, *coarse)
                source = F.interpolate(ids, size=out_size, mode="nearest").long().flatten().to(self.device)
                positions = torch.where(positions >= 0, source[positions.clamp(min=0)], positions)
            self._plans[key] = gather_plan(positions, p.rank[in_level])
        return self._plans[key]


class SparseUNet:
    """Runs `unet` on the active cells of a mask pyramid, reading the rest from a parent's cache.

    Holds each k x k conv's weight a second time, laid out for the patch GEMM (`conv_matrix`): about
    60% more weight memory for a Stable Diffusion U-Net, for a sparse conv that moves half the data.
    """

    def __init__(self, unet: UNet2DConditionModel):
        validate_unet(unet)
        self.unet = unet
        self.names = {m: n for n, m in unet.named_modules()}
        self._matrices: dict[nn.Conv2d, tuple[tuple, torch.Tensor]] = {}

    def conv_matrix(self, conv: nn.Conv2d) -> torch.Tensor:
        """`conv`'s weight as a GEMM matrix, laid out once per weight tensor (again if it changes)."""
        w = conv.weight
        identity = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = self._matrices.get(conv)
        if cached is None or cached[0] != identity:
            cached = (identity, conv_matrix(w.detach()))
            self._matrices[conv] = cached
        return cached[1]

    def level_sizes(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        return level_sizes(self.unet, latent_size)

    @torch.no_grad()
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        parent: CacheReader,
        plans: GatherPlans,
        record: dict[str, torch.Tensor] | None = None,
        store: ActivationCache | None = None,
    ) -> torch.Tensor:
        """The U-Net output `[B, N0, C_out]` at the active latent cells.

        `sample` is the whole (mixed) model input `[B, C, h, w]`; `record`, if given, receives the
        delta of this step for a new cache, in `store`'s storage dtype.
        """
        run = _Run(self, sample, timestep, encoder_hidden_states, parent, plans, record, store)
        return run.forward()


class _Run:
    """One sparse U-Net forward; mirrors `UNet2DConditionModel.forward` block by block."""

    def __init__(self, sparse: SparseUNet, sample, timestep, text, parent, plans, record, store):
        self.sparse, self.unet, self.names = sparse, sparse.unet, sparse.names
        self.sample, self.text, self.parent, self.plans = sample, text, parent, plans
        self.record, self.store = record, store
        self.pyramid = plans.pyramid
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        self.temb = unet.time_embed_act(emb) if unet.time_embed_act is not None else emb

    # ---- top level ----------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        unet = self.unet
        full_input = tokens(self.sample)
        x0 = Active(full_input[:, self.pyramid.cells[0]], 0)
        h = self.conv(unet.conv_in, x0, lambda cells: full_input[:, cells])
        skips = [h]
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None)
            for i, resnet in enumerate(block.resnets):
                h = self.resnet(resnet, h)
                if attentions is not None:
                    h = self.transformer(attentions[i], h)
                skips.append(h)
            if block.downsamplers is not None:
                h = self.downsample(block.downsamplers[0], h)
                skips.append(h)
        mid = unet.mid_block
        h = self.resnet(mid.resnets[0], h)
        for i, resnet in enumerate(mid.resnets[1:]):
            if getattr(mid, "attentions", None) is not None:
                h = self.transformer(mid.attentions[i], h)
            h = self.resnet(resnet, h)
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None)
            for i, resnet in enumerate(block.resnets):
                skip = skips.pop()
                h = self.resnet(resnet, Active(torch.cat([h.values, skip.values], dim=-1), h.level))
                if attentions is not None:
                    h = self.transformer(attentions[i], h)
            if block.upsamplers is not None:
                h = self.upsample(block.upsamplers[0], h)
        y, halo = self.norm_act(unet.conv_norm_out, "conv_norm_out", h, silu=True)
        return self.conv(unet.conv_out, Active(y, h.level), halo).values

    # ---- cache access -------------------------------------------------------------------------
    def put(self, key: str, values: torch.Tensor) -> None:
        if self.record is not None:
            self.store.put(self.record, key, values)

    # ---- operators ----------------------------------------------------------------------------
    def conv(self, conv: nn.Conv2d, x: Active, halo_of, out_level=None, upsampled=False) -> Active:
        """`conv` at the active cells of `out_level`; `halo_of(cells)` gives input values outside."""
        out_level = x.level if out_level is None else out_level
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and not upsampled:
            w = conv.weight.reshape(conv.out_channels, conv.in_channels)
            return Active(F.linear(x.values, w, conv.bias), out_level)
        index, halo_cells = self.plans.conv(conv, x.level, out_level, upsampled)
        if len(halo_cells):
            halo = halo_of(halo_cells)
        else:
            halo = x.values.new_zeros(x.values.shape[0], 0, x.values.shape[2])
        out = sparse_conv2d(x.values, halo, index, self.sparse.conv_matrix(conv), conv.bias)
        return Active(out, out_level)

    def norm_act(self, norm: nn.GroupNorm, key: str, x: Active, silu: bool):
        """Group norm (+ SiLU) of the mixed map at active cells, and the halo function for the conv
        that reads it: the parent's own normalised values. Where no conv reads the output the cache
        may hold per-cell sums of the norm's input instead of the input (`NORM_CELL_SUMS`)."""
        sums_only = self.parent.cache.kinds[key] == NORM_CELL_SUMS
        cells = self.pyramid.cells[x.level]
        hw = self.pyramid.masks[x.level].numel()
        groups = norm.num_groups
        count = hw * x.values.shape[-1] // groups
        parent_sums = self.parent.stats(key)
        if sums_only:
            removed = sum_cells(self.parent.gather(key, cells))
            new_cells = cell_sums(x.values, groups)
            sums = parent_sums - removed + sum_cells(new_cells)
        else:
            removed = group_sums(self.parent.gather(key, cells), groups)
            sums = parent_sums - removed + group_sums(x.values, groups)
        mean, rstd = group_stats(sums, count, norm.eps)
        y = group_norm_act(x.values, mean, rstd, norm.weight, norm.bias, silu)
        if self.record is not None:
            if sums_only:
                self.record[key] = new_cells
            else:  # statistics of what is stored, not of what was computed
                stored = self.store.put(self.record, key, x.values)
                sums = parent_sums - removed + group_sums(stored, groups)
            self.record[key + STATS] = sums

        def halo(halo_cells: torch.Tensor) -> torch.Tensor:
            return self.parent.gather_normalized(key, halo_cells, norm, silu)

        return y, halo

    # ---- blocks -------------------------------------------------------------------------------
    def resnet(self, resnet, x: Active) -> Active:
        name = self.names[resnet]
        y, halo = self.norm_act(resnet.norm1, f"{name}.norm1", x, silu=True)
        h = self.conv(resnet.conv1, Active(y, x.level), halo)
        if resnet.time_emb_proj is not None:
            temb = resnet.time_emb_proj(F.silu(self.temb))
            h = Active(h.values + temb[:, None, :], h.level)
        y, halo = self.norm_act(resnet.norm2, f"{name}.norm2", h, silu=True)
        h = self.conv(resnet.conv2, Active(y, h.level), halo)
        shortcut = x
        if resnet.conv_shortcut is not None:
            key = f"{name}.norm1"  # the shortcut reads the block input, which is norm1's input
            shortcut = self.conv(resnet.conv_shortcut, x, lambda cells: self.parent.gather(key, cells))
        return Active((shortcut.values + h.values) / resnet.output_scale_factor, x.level)

    def transformer(self, tr, x: Active) -> Active:
        name = self.names[tr]
        y, _ = self.norm_act(tr.norm, f"{name}.norm", x, silu=False)  # followed by a 1x1: no halo
        h = self.pointwise(tr.proj_in, y)
        for block in tr.transformer_blocks:
            h = self.transformer_block(block, h, x.level)
        return Active(self.pointwise(tr.proj_out, h) + x.values, x.level)

    def transformer_block(self, block, h: torch.Tensor, level: int) -> torch.Tensor:
        name = self.names[block]
        attn = block.attn1
        n = block.norm1(h)
        q, k, v = attn.to_q(n), attn.to_k(n), attn.to_v(n)
        cells = self.pyramid.cells[level]
        keys = self.parent.full(f"{name}.attn1.to_k")
        values = self.parent.full(f"{name}.attn1.to_v")
        keys[:, cells], values[:, cells] = k, v
        self.put(f"{name}.attn1.to_k", k)
        self.put(f"{name}.attn1.to_v", v)
        out = active_query_attention(q, keys, values, attn.heads)
        h = attn.to_out[1](attn.to_out[0](out)) + h
        if block.attn2 is not None:
            h = block.attn2(block.norm2(h), encoder_hidden_states=self.text) + h
        return block.ff(block.norm3(h)) + h

    def downsample(self, down, x: Active) -> Active:
        key = f"{self.names[down]}.conv"
        self.put(key, x.values)
        return self.conv(down.conv, x, lambda cells: self.parent.gather(key, cells), x.level + 1)

    def upsample(self, up, x: Active) -> Active:
        key = self.names[up]
        self.put(key, x.values)
        return self.conv(up.conv, x, lambda cells: self.parent.gather(key, cells), x.level - 1, True)

    @staticmethod
    def pointwise(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(proj, nn.Conv2d):
            return F.linear(x, proj.weight.reshape(proj.out_channels, proj.in_channels), proj.bias)
        return proj(x)
