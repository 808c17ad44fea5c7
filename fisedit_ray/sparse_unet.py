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

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from torch import nn

from fisedit_ray.cache import STATS, ActivationCache, CacheReader
from fisedit_ray.kernels.attention import active_query_attention, head_major_keys
from fisedit_ray.kernels.chunks import row_chunks
from fisedit_ray.kernels.conv import conv_matrix, dense_conv2d, sparse_conv2d
from fisedit_ray.kernels.conv_cost import ConvCosts
from fisedit_ray.kernels.gather import conv_input_positions, gather_plan
from fisedit_ray.kernels.group_norm import (
    cell_sums,
    group_stats,
    group_sums,
    norm_scale_shift,
    segment_norm_act,
    segment_sums,
)
from fisedit_ray.kernels.linear import GemmWeight, linear
from fisedit_ray.masks import MaskPyramid
from fisedit_ray.unet_layout import NORM_CELL_SUMS, level_sizes, tokens, validate_unet


@dataclass
class Active:
    """Values `[B, N, C]` at the active cells of one level."""

    values: torch.Tensor
    level: int


def bucket_size(n: int) -> int:
    """The rows a padded pass computes for `n` active cells (or halo cells): 0 for none, else the
    next size of the ladder 8, 12, 16, 24, 32, 48, 64, ...: under one and a half times `n` past 8,
    and few sizes, so that one compiled step program serves many masks."""
    size = 8
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size if n else 0


def halo_bucket_size(n: int, rows: int) -> int:
    """The rows a padded pass reads for `n` halo cells of a conv over `rows` (padded) active input
    rows: 0 for none, else `rows` times a power of two (at least 8): halos follow their active
    cells, so masks of the same active buckets mostly share their halo buckets too."""
    size = max(rows, 8)
    while size < n:
        size *= 2
    return size if n else 0


class GatherPlans:
    """Index plans of one mask pyramid, built once per edit and reused at every step, and which of
    its convs run dense (`costs`, a measured table; by default the one shipped for the device and
    `dtype`).

    `padded`: each level's active cells and each conv's halo cells padded up to their buckets, so
    that a pass's shapes depend only on the buckets (`step_program`): a padded row repeats the last
    real cell (so it computes that cell's values again, which the pass writes nowhere: statistics
    leave it out, records and outputs drop it), and every conv runs pixel-wise."""

    def __init__(
        self,
        pyramid: MaskPyramid,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        costs: ConvCosts | None = None,
        padded: bool = False,
    ):
        self.pyramid = pyramid.to(device)
        self.device = device
        self.costs = costs or ConvCosts.shipped(torch.device(device).type, dtype)
        self.padded = padded
        # the rows a pass computes at each level: the active cells, then any padding
        self.cells = tuple(_padded(cells) if padded else cells for cells in self.pyramid.cells)
        self._plans: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dense: dict[tuple, bool] = {}
        self._inactive: dict[int, torch.Tensor] = {}

    def runs_dense(self, site: tuple) -> bool:
        """Whether the conv at `site` (`SparseUNet.conv_sites`) runs dense for this mask."""
        if self.padded:
            return False
        if site not in self._dense:
            conv, _, out_level, _ = site
            cells = self.pyramid.masks[out_level].numel()
            fraction = len(self.pyramid.cells[out_level]) / cells
            self._dense[site] = conv.kernel_size != (1, 1) and self.costs.runs_dense(
                cells, conv.in_channels, conv.out_channels, fraction
            )
        return self._dense[site]

    def inactive(self, level: int) -> torch.Tensor:
        """The inactive cells of `level`, in row-major order."""
        if level not in self._inactive:
            self._inactive[level] = (~self.pyramid.masks[level].flatten()).nonzero().flatten()
        return self._inactive[level]

    def dense_signature(self, sites: Iterable[tuple]) -> tuple[bool, ...]:
        """Which of `sites` run dense: with the active cells, what a pass's MACs depend on."""
        return tuple(self.runs_dense(site) for site in sites)

    def conv(self, conv: nn.Conv2d, in_level: int, out_level: int, upsampled: bool):
        """`(index, halo_cells)`: the pixel-wise conv's gather plan (`gather_plan`) for the rows of
        `cells` (a padded plan's halo cells padded too, its index reading none of the extra ones)."""
        key = (conv.kernel_size, conv.stride, conv.padding, in_level, out_level, upsampled)
        if key not in self._plans:
            p = self.pyramid
            out_size = p.sizes[out_level]
            grid = out_size if upsampled else p.sizes[in_level]
            positions = conv_input_positions(
                self.cells[out_level], out_size[1], grid, conv.kernel_size[0], conv.stride[0], conv.padding[0]
            )
            if upsampled:  # the conv reads a nearest-upsampled map: map its cells to the coarse ones
                coarse = p.sizes[in_level]
                ids = torch.arange(coarse[0] * coarse[1], dtype=torch.float32).reshape(1, 1, *coarse)
                source = F.interpolate(ids, size=out_size, mode="nearest").long().flatten().to(self.device)
                positions = torch.where(positions >= 0, source[positions.clamp(min=0)], positions)
            rows = len(self.cells[in_level])
            index, halo_cells = gather_plan(positions, p.rank[in_level], rows)
            if self.padded:  # the zero row moves past the padded halo rows
                halo_rows = halo_bucket_size(len(halo_cells), rows)
                index = torch.where(index == rows + len(halo_cells), rows + halo_rows, index)
                halo_cells = _padded(halo_cells, halo_rows)
            self._plans[key] = (index, halo_cells)
        return self._plans[key]


class SparseUNet:
    """Runs `unet` on the active cells of a mask pyramid, reading the rest from a parent's cache.

    Holds weights a second time, prepared for their GEMMs (`kernels.linear.GemmWeight`): every
    k x k conv's laid out for the patch GEMM (`conv_matrix`), and on a CPU the big ones (all, in
    bf16) packed for oneDNN. For a Stable Diffusion 1.5 U-Net on a CPU, 94% more weight memory in
    fp32 (63% with k x k convs alone, on a GPU), for GEMMs up to 2.7x faster over few rows.
    `packed=False` keeps every weight plain, as a compiled step program needs them (inductor cannot
    take oneDNN's packed weights as inputs).
    """

    def __init__(self, unet: UNet2DConditionModel, packed: bool = True):
        validate_unet(unet)
        self.unet = unet
        self.packed = packed
        self.names = {m: n for n, m in unet.named_modules()}
        self._gemm_weights: dict[nn.Module, tuple[tuple, GemmWeight]] = {}
        self._pass_indices: tuple[tuple, dict] = ((), {})
        # every k x k conv of a pass as `(conv, in_level, out_level, upsampled)`, in pass order:
        # the same for every pass, known once one has run (`GatherPlans.dense_signature`)
        self.conv_sites: dict[tuple, None] = {}

    def pass_indices(self, lanes: list[Lane]) -> dict:
        """Index tensors of a pass over these lanes (conv gathers, each level's lane segments and
        map sizes), kept while the same edits run together (every step of one `edit_batch`): they
        depend on each lane's plans and on where its parent's chain keeps the halo cells
        (`CacheReader.grouped_order`)."""
        key = tuple(item for lane in lanes for item in (lane.plans, lane.parent.cache))
        held, indices = self._pass_indices
        if len(held) != len(key) or any(a is not b for a, b in zip(held, key, strict=False)):
            self._pass_indices = (key, indices := {})
        return indices

    def gemm_weight(self, layer: nn.Linear | nn.Conv2d) -> GemmWeight:
        """`layer`'s weight as its GEMM reads it (a conv's as `conv_matrix` lays it out), prepared
        once per weight tensor (again if it changes)."""
        cached = self._gemm_weights.get(layer)
        if cached is not None and torch.compiler.is_compiling():  # prepared by the eager first step
            return cached[1]
        w = layer.weight
        identity = (w.data_ptr(), w._version, w.dtype, w.device)
        if cached is None or cached[0] != identity:
            matrix = w.detach()
            if isinstance(layer, nn.Conv2d):
                matrix = conv_matrix(matrix) if layer.kernel_size != (1, 1) else matrix.flatten(1)
            cached = (identity, GemmWeight.of(matrix) if self.packed else GemmWeight(matrix.detach()))
            self._gemm_weights[layer] = cached
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
        scratch: dict | None = None,
    ) -> torch.Tensor:
        """The U-Net output `[B, N0, C_out]` at the active latent cells.

        `sample` is the whole (mixed) model input `[B, C, h, w]`; `record`, if given, receives the
        delta of this step for a new cache, in `store`'s storage dtype; `scratch`, buffers to reuse
        at the next step of the same edit (see `Lane.scratch`).
        """
        scratch = {} if scratch is None else scratch
        lane = Lane(sample, timestep, encoder_hidden_states, parent, plans, record, store, scratch=scratch)
        return self.run_lanes([lane])[0]

    @torch.no_grad()
    def run_lanes(self, lanes: list[Lane]) -> list[torch.Tensor]:
        """Several requests in one pass (each its own mask, cache, prompt and timestep): their active
        rows are concatenated, so every GEMM runs once for all of them; group norms, attention and
        the timestep embedding stay per request. Returns each lane's output, as `__call__` would."""
        return _Run(self, lanes).forward()


@dataclass
class Lane:
    """One request of a sparse pass."""

    sample: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    parent: CacheReader
    plans: GatherPlans
    record: dict[str, torch.Tensor] | None = None
    store: ActivationCache | None = None
    text_kv: dict = field(default_factory=dict)  # cross-attention keys/values of `text`, by module
    scratch: dict = field(default_factory=dict)  # maps refilled at every step (`CacheReader.full`)


class _Run:
    """One sparse U-Net forward over lanes; mirrors `UNet2DConditionModel.forward` block by block.

    Values are `[B, sum of the lanes' active cells, C]`, lane after lane."""

    def __init__(self, sparse: SparseUNet, lanes: list[Lane]):
        self.sparse, self.unet, self.names = sparse, sparse.unet, sparse.names
        self.lanes = lanes
        self.device = lanes[0].sample.device
        # per-lane constants of each level, made once for all the steps of the same lanes (on a GPU,
        # each would otherwise be a small copy from the host that waits for the GPU at every step)
        self._held = sparse.pass_indices(lanes)
        if len({lane.sample.shape[0] for lane in lanes}) != 1:
            raise ValueError("lanes of one pass must share the batch size (guidance on or off)")
        unet = self.unet
        temb = []
        for lane in lanes:
            t_emb = unet.get_time_embed(sample=lane.sample, timestep=lane.timestep)
            emb = unet.time_embedding(t_emb, None)
            temb.append(unet.time_embed_act(emb) if unet.time_embed_act is not None else emb)
        self.temb_act = F.silu(torch.cat(temb))  # [lanes * B, D]: what every resnet projects

    def counts(self, level: int) -> list[int]:
        """Each lane's rows at `level`: its active cells, and any padding (`GatherPlans.padded`)."""
        return [len(lane.plans.cells[level]) for lane in self.lanes]

    def split(self, values: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        return values.split(self.counts(level), dim=1)

    def map_cells(self, level: int) -> torch.Tensor:
        """`[lanes, 1]` float64: the number of cells of each lane's whole map at `level`."""
        key = ("map_cells", level)
        if key not in self._held:
            cells = [lane.plans.pyramid.masks[level].numel() for lane in self.lanes]
            self._held[key] = torch.tensor(cells, dtype=torch.float64, device=self.device)[:, None]
        return self._held[key]

    def segment(self, level: int) -> torch.Tensor:
        """The lane of each row of `level`, as the values are concatenated."""
        key = ("segment", level)
        if key not in self._held:
            counts = torch.tensor(self.counts(level))
            self._held[key] = torch.repeat_interleave(counts).to(self.device)
        return self._held[key]

    def sum_segment(self, level: int) -> torch.Tensor | None:
        """The segment each row of `level` adds its statistics to (`segment_sums`): its lane, or
        none for a padded row; None for one unpadded lane (all rows, one sum)."""
        key = ("sum_segment", level)
        if key not in self._held:
            lanes = self.lanes
            if len(lanes) == 1 and not lanes[0].plans.padded:
                self._held[key] = None
            else:
                owners = []
                for j, (lane, rows) in enumerate(zip(lanes, self.counts(level), strict=True)):
                    real = len(lane.plans.pyramid.cells[level])
                    owners += [j] * real + [len(lanes)] * (rows - real)
                self._held[key] = torch.tensor(owners, device=self.device)
        return self._held[key]

    def real_rows(self, j: int, level: int) -> torch.Tensor:
        """`[rows, 1]`: 1 for lane `j`'s rows of real cells at `level`, 0 for its padding."""
        key = ("real_rows", j, level)
        if key not in self._held:
            plans = self.lanes[j].plans
            real = torch.arange(len(plans.cells[level]), device=self.device) < len(plans.pyramid.cells[level])
            self._held[key] = real[:, None]
        return self._held[key]

    # ---- top level ----------------------------------------------------------------------------
    def forward(self) -> list[torch.Tensor]:
        unet = self.unet
        inputs = [tokens(lane.sample) for lane in self.lanes]
        active = [x.index_select(1, lane.plans.cells[0]) for x, lane in zip(inputs, self.lanes, strict=True)]
        x0 = torch.cat(active, dim=1)
        h = self.conv(unet.conv_in, Active(x0, 0), lambda j, cells: (inputs[j].index_select(1, cells), None))
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
        return list(self.split(self.conv(unet.conv_out, Active(y, h.level), halo).values, 0))

    # ---- cache access -------------------------------------------------------------------------
    def put(self, key: str, x: Active) -> None:
        for lane, values in zip(self.lanes, self.split(x.values, x.level), strict=True):
            if lane.record is not None:
                lane.store.put(lane.record, key, values)

    # ---- operators ----------------------------------------------------------------------------
    def conv(self, conv: nn.Conv2d, x: Active, halo_of, out_level=None, upsampled=False) -> Active:
        """`conv` at the active cells of `out_level`; `halo_of(lane, cells)` gives a lane's input
        values outside. Each lane's plans say whether the conv runs pixel-wise or dense for its mask
        (`GatherPlans.runs_dense`); the pixel-wise lanes share one gather and one GEMM."""
        out_level = x.level if out_level is None else out_level
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and not upsampled:
            return Active(self.pointwise(conv, x.values), out_level)
        site = (conv, x.level, out_level, upsampled)
        self.sparse.conv_sites.setdefault(site)
        dense = [lane.plans.runs_dense(site) for lane in self.lanes]
        if not any(dense):
            return Active(self.pixel_wise_conv(site, list(range(len(dense))), x.values, halo_of), out_level)
        inputs, outs = self.split(x.values, x.level), {}
        pixel_wise = [j for j, d in enumerate(dense) if not d]
        if pixel_wise:
            values = _cat([inputs[j] for j in pixel_wise])
            out = self.pixel_wise_conv(site, pixel_wise, values, halo_of)
            counts = self.counts(out_level)
            outs.update(zip(pixel_wise, out.split([counts[j] for j in pixel_wise], dim=1), strict=True))
        for j in (j for j, d in enumerate(dense) if d):
            outs[j] = self.dense_conv(site, j, inputs[j], halo_of)
        return Active(_cat([outs[j] for j in range(len(dense))]), out_level)

    def pixel_wise_conv(self, site: tuple, lanes: list[int], values: torch.Tensor, halo_of) -> torch.Tensor:
        """The conv at `site` for `lanes` (their active input rows `values`, concatenated): one
        gather and one GEMM, each lane's plan shifted to its rows of the concatenated active values
        and halos."""
        conv, in_level, out_level, upsampled = site
        plans = [self.lanes[j].plans.conv(conv, in_level, out_level, upsampled) for j in lanes]
        halos, orders = [], []
        for j, (_, cells) in zip(lanes, plans, strict=True):
            order = None
            if len(cells):
                halo_values, order = halo_of(j, cells)
                halos.append(halo_values.to(values.dtype))
            orders.append(order)
        halo = _cat(halos) if halos else values[:, :0]
        indices = self._held
        key = (*site, tuple(lanes))
        if key not in indices:  # once per edit: the halos' order is the same at every step
            all_counts = self.counts(in_level)
            counts = [all_counts[j] for j in lanes]
            plans = [
                (_reordered(index, n, order), cells)
                for (index, cells), n, order in zip(plans, counts, orders, strict=True)
            ]
            indices[key] = plans[0][0] if len(plans) == 1 else _pass_index(plans, counts)
        # one patch buffer for every conv of the pass, kept for all its steps (see `sparse_conv2d`)
        workspace = indices.get(("patches", values.dtype))
        if workspace is None:
            workspace = indices[("patches", values.dtype)] = values.new_empty(0)
        return sparse_conv2d(values, halo, indices[key], self.sparse.gemm_weight(conv), conv.bias, workspace)

    def dense_conv(self, site: tuple, j: int, values: torch.Tensor, halo_of) -> torch.Tensor:
        """The conv at `site` for lane `j` over its whole input map: its active rows `values`, every
        other cell from `halo_of` (as a halo is); the outputs at its active cells."""
        conv, in_level, out_level, upsampled = site
        plans = self.lanes[j].plans
        pyramid = plans.pyramid
        inactive, fill = plans.inactive(in_level), values[:, :0]
        if len(inactive):
            fill, order = halo_of(j, inactive)
            inactive = inactive if order is None else inactive[order]
        return dense_conv2d(
            values,
            pyramid.cells[in_level],
            fill,
            inactive,
            pyramid.sizes[in_level],
            conv,
            pyramid.cells[out_level],
            pyramid.sizes[out_level] if upsampled else None,
        )

    def norm_act(self, norm: nn.GroupNorm, key: str, x: Active, silu: bool):
        """Group norm (+ SiLU) of each lane's mixed map at its active cells, and the halo function
        for the conv that reads it: the parent's own normalised values. Where no conv reads the
        output the cache may hold per-cell sums of the norm's input (`NORM_CELL_SUMS`).

        All lanes at once: each lane's sums are a segment of the per-cell sums, so the op count does
        not grow with the lanes, except for reading and recording each lane's own cache."""
        groups, channels, level = norm.num_groups, x.values.shape[-1], x.level
        lanes, segment, sum_segment = self.lanes, self.segment(level), self.sum_segment(level)
        padded = any(lane.plans.padded for lane in lanes)
        kinds = {lane.parent.cache.kinds[key] for lane in lanes}
        if len(kinds) > 1:
            raise ValueError(f"lanes of one pass store {key!r} differently: {sorted(kinds)}")
        sums_only = kinds.pop() == NORM_CELL_SUMS
        parent_sums = torch.stack([lane.parent.stats(key) for lane in lanes], dim=2)  # [2, B, L, G]
        # each lane's rows in its chain's order (only their sums are needed), or in the pass's order
        # where some are padding, which the sums leave out
        parent_rows = _cat([lane.parent.gather(key, lane.plans.cells[level], not padded) for lane in lanes])
        if sums_only:  # the parent keeps per-cell sums in float32; so will this edit
            new_cells = cell_sums(x.values, groups)
            removed = segment_sums(parent_rows, sum_segment, len(lanes))
        else:
            new_cells = cell_sums(x.values, groups, torch.float64)
            removed = segment_sums(cell_sums(parent_rows, groups, torch.float64), sum_segment, len(lanes))
        sums = parent_sums - removed + segment_sums(new_cells, sum_segment, len(lanes))
        mean, rstd = group_stats(sums, self.map_cells(level) * (channels // groups), norm.eps)
        scale, shift = norm_scale_shift(mean, rstd, norm.weight, norm.bias, channels, x.values.dtype)
        out = segment_norm_act(x.values, segment, scale, shift, silu)
        lane_sums = sums.permute(2, 0, 1, 3).contiguous().unbind(0)  # one copy for all lanes
        for j, (lane, values, lane_cells) in enumerate(
            zip(lanes, self.split(x.values, level), self.split(new_cells, level), strict=True)
        ):
            if lane.record is None:
                continue
            stats = lane_sums[j]
            if sums_only:
                lane.record[key] = lane_cells.contiguous()  # its own rows, not a view of the batch's
            else:
                stored = lane.store.put(lane.record, key, values)
                if lane.store.storage_dtype != values.dtype:  # statistics of what is stored
                    stored = stored * self.real_rows(j, level) if lane.plans.padded else stored
                    stats = parent_sums[:, :, j] - removed[:, :, j] + group_sums(stored, groups)
            lane.record[key + STATS] = stats

        def halo(j: int, halo_cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            parent = self.lanes[j].parent
            values = parent.gather_normalized(key, halo_cells, norm, silu, grouped=True)
            return values, parent.grouped_order(key, halo_cells)

        return out, halo

    # ---- blocks -------------------------------------------------------------------------------
    def resnet(self, resnet, x: Active) -> Active:
        name = self.names[resnet]
        y, halo = self.norm_act(resnet.norm1, f"{name}.norm1", x, silu=True)
        h = self.conv(resnet.conv1, Active(y, x.level), halo)
        if resnet.time_emb_proj is not None:
            temb = self.pointwise(resnet.time_emb_proj, self.temb_act)
            temb = temb.view(len(self.lanes), -1, temb.shape[-1]).transpose(0, 1)  # [B, lanes, C]
            if len(self.lanes) > 1:  # [B, lanes, C] -> [B, N, C]: each active cell its lane's row
                temb = temb.index_select(1, self.segment(h.level))
            h = Active(h.values + temb, h.level)
        y, halo = self.norm_act(resnet.norm2, f"{name}.norm2", h, silu=True)
        h = self.conv(resnet.conv2, Active(y, h.level), halo)
        shortcut = x
        if resnet.conv_shortcut is not None:
            key = f"{name}.norm1"  # the shortcut reads the block input, which is norm1's input
            shortcut = self.conv(resnet.conv_shortcut, x, self.cached(key))
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
        q, k, v = self.pointwise(attn.to_q, n), self.pointwise(attn.to_k, n), self.pointwise(attn.to_v, n)
        counts = self.counts(level)
        heads = attn.heads if head_major_keys(q.device) else None
        outs = []
        for lane, q_j, k_j, v_j in zip(self.lanes, *(t.split(counts, dim=1) for t in (q, k, v)), strict=True):
            cells = lane.plans.cells[level]  # a padded row writes its cell's own values again
            keys = lane.parent.full(f"{name}.attn1.to_k", lane.scratch, heads)
            values = lane.parent.full(f"{name}.attn1.to_v", lane.scratch, heads)
            keys[:, cells], values[:, cells] = (x.reshape(*x.shape[:2], *keys.shape[2:]) for x in (k_j, v_j))
            if lane.record is not None:
                lane.store.put(lane.record, f"{name}.attn1.to_k", k_j)
                lane.store.put(lane.record, f"{name}.attn1.to_v", v_j)
            outs.append(active_query_attention(q_j, keys, values, attn.heads))
        h = attn.to_out[1](self.pointwise(attn.to_out[0], torch.cat(outs, dim=1))) + h
        if block.attn2 is not None:
            h = self.cross_attention(block.attn2, block.norm2(h), counts) + h
        return self.feed_forward(block.ff, block.norm3(h)) + h

    def cross_attention(self, attn, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`attn(x, encoder_hidden_states=text)` with each lane's own text."""
        q = self.pointwise(attn.to_q, x)
        outs = []
        for lane, q_j in zip(self.lanes, q.split(counts, dim=1), strict=True):
            kv = lane.text_kv.get(attn)
            if kv is None:  # the text is the same at every step: project it once per edit
                kv = (self.pointwise(attn.to_k, lane.text), self.pointwise(attn.to_v, lane.text))
                lane.text_kv[attn] = kv
            outs.append(active_query_attention(q_j, *kv, attn.heads))
        return attn.to_out[1](self.pointwise(attn.to_out[0], torch.cat(outs, dim=1)))

    def downsample(self, down, x: Active) -> Active:
        key = f"{self.names[down]}.conv"
        self.put(key, x)
        return self.conv(down.conv, x, self.cached(key), x.level + 1)

    def upsample(self, up, x: Active) -> Active:
        key = self.names[up]
        self.put(key, x)
        return self.conv(up.conv, x, self.cached(key), x.level - 1, True)

    def cached(self, key: str):
        """The halo function reading a lane's parent's stored values of `key` (see `conv`)."""

        def halo(j: int, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            parent = self.lanes[j].parent
            return parent.gather(key, cells, grouped=True), parent.grouped_order(key, cells)

        return halo

    def pointwise(self, layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """`layer` (a linear or a 1x1 conv) on token-major rows, through its prepared weight."""
        return linear(x, self.sparse.gemm_weight(layer), layer.bias)

    def feed_forward(self, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`ff(x)` (dropout is off in eval) with its GEGLU's and output's dense layers through
        `pointwise`; over many rows, in row chunks (`row_chunks`: the GEGLU's hidden rows are the
        pass's biggest temporaries)."""
        geglu, out = ff.net[0], ff.net[2]
        if not isinstance(geglu, GEGLU):
            return ff(x)
        outs = []
        for rows in row_chunks(x.flatten(0, 1), 0, geglu.proj.out_features * x.element_size()):
            hidden, gate = self.pointwise(geglu.proj, rows).chunk(2, dim=-1)
            outs.append(self.pointwise(out, hidden * geglu.gelu(gate)))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).unflatten(0, x.shape[:2])


def _pass_index(plans: list[tuple[torch.Tensor, torch.Tensor]], active_counts: list[int]) -> torch.Tensor:
    """One gather index for a pass from each lane's `(index, halo_cells)` plan: a lane's rows
    [active_j, halo_j, zero] become rows of [all active, all halos, one shared zero row]."""
    total_active = sum(active_counts)
    halo_total = sum(len(cells) for _, cells in plans)
    indices, active_base, halo_base = [], 0, 0
    for (index, halo_cells), n in zip(plans, active_counts, strict=True):
        m = len(halo_cells)
        inside = torch.where(index < n + m, index - n + total_active + halo_base, total_active + halo_total)
        indices.append(torch.where(index < n, index + active_base, inside))
        active_base, halo_base = active_base + n, halo_base + m
    return torch.cat(indices)


def _reordered(index: torch.Tensor, active: int, order: torch.Tensor | None) -> torch.Tensor:
    """A lane's gather plan `index` (rows `[active, halo, zero]`) for its halo rows in `order` (the
    halo position each row holds, `CacheReader.grouped_order`) instead of in the plan's order."""
    if order is None:
        return index
    halos = len(order)
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(halos, device=order.device)
    is_halo = (index >= active) & (index < active + halos)
    return torch.where(is_halo, active + row_of[(index - active).clamp(0, halos - 1)], index)


def _cat(rows: list[torch.Tensor]) -> torch.Tensor:
    """Lanes' rows `[B, n_j, C]` as one tensor (no copy for a single lane)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


def _padded(cells: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """`cells` padded to `rows` (default: `bucket_size`) by repeating the last one."""
    extra = (bucket_size(len(cells)) if rows is None else rows) - len(cells)
    return torch.cat([cells, cells[-1:].expand(extra)]) if extra else cells
