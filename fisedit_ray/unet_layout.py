"""What fisedit-ray knows of a diffusers U-Net: which ones it supports, its levels, its cache points."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

NORM_INPUT = "norm_input"
NORM_CELL_SUMS = "norm_cell_sums"  # a group norm whose output no conv reads: per-cell group sums suffice
ATTN_KEY = "attn_key"
ATTN_VALUE = "attn_value"
DOWN_INPUT = "down_input"
UP_INPUT = "up_input"

SUPPORTED_BLOCKS = {
    "CrossAttnDownBlock2D",
    "DownBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UNetMidBlock2D",
    "CrossAttnUpBlock2D",
    "UpBlock2D",
}


class UnsupportedModelError(ValueError):
    pass


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedModelError(f"sparse editing supports Stable Diffusion 1.x/2.x U-Nets; {what}")


def validate_unet(unet: nn.Module) -> None:
    """Raise `UnsupportedModelError` naming the first feature sparse execution does not implement."""
    _require(isinstance(unet, UNet2DConditionModel), f"got {type(unet).__name__}")
    cfg = unet.config
    _require(cfg.class_embed_type is None and cfg.num_class_embeds is None, "class embeddings are not")
    _require(cfg.addition_embed_type is None, "addition embeddings (SDXL) are not")
    _require(cfg.encoder_hid_dim is None, "encoder_hid_proj is not")
    _require(cfg.time_cond_proj_dim is None, "timestep conditioning (LCM) is not")
    _require(not cfg.center_input_sample, "center_input_sample is not")
    _require(cfg.act_fn == "silu", f"act_fn must be silu, got {cfg.act_fn}")
    _require(unet.conv_norm_out is not None, "a U-Net without conv_norm_out is not")
    _require(unet.mid_block is not None, "a U-Net without a mid block is not")
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        _require(type(block).__name__ in SUPPORTED_BLOCKS, f"block {type(block).__name__} is not")
        for attn in getattr(block, "attentions", None) or []:
            _require(isinstance(attn, Transformer2DModel), f"{type(attn).__name__} attention is not")
    for name, m in unet.named_modules():
        if isinstance(m, nn.Conv2d):
            square = len(set(m.kernel_size)) == len(set(m.stride)) == len(set(m.padding)) == 1
            plain = m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
            _require(square and plain, f"{name}: only plain square convolutions are supported")
        elif isinstance(m, ResnetBlock2D):
            _require(m.upsample is None and m.downsample is None, f"{name}: resampling resnets are not")
            _require(m.time_embedding_norm == "default", f"{name}: time_embedding_norm must be default")
            _require(isinstance(m.nonlinearity, nn.SiLU), f"{name}: non-SiLU resnets are not")
            _require(not m.skip_time_act, f"{name}: skip_time_act is not")
        elif isinstance(m, Transformer2DModel):
            _require(m.is_input_continuous, f"{name}: only continuous transformer inputs are")
        elif isinstance(m, BasicTransformerBlock):
            _require(m.norm_type == "layer_norm", f"{name}: norm_type must be layer_norm")
            _require(m.pos_embed is None and not m.only_cross_attention, f"{name}: options not supported")
            _require(m._chunk_size is None and not hasattr(m, "fuser"), f"{name}: chunked/GLIGEN not")
            attn = m.attn1
            _require(
                attn.spatial_norm is None
                and attn.group_norm is None
                and attn.norm_q is None
                and attn.norm_k is None
                and not attn.residual_connection
                and attn.rescale_output_factor == 1.0,
                f"{name}.attn1: attention options not supported",
            )
            _require(
                isinstance(attn.processor, AttnProcessor2_0 | AttnProcessor),
                f"{name}.attn1: custom attention processors are not",
            )
        elif isinstance(m, Downsample2D):
            _require(m.use_conv and m.padding == 1 and m.norm is None, f"{name}: downsampler not supported")
        elif isinstance(m, Upsample2D):
            _require(
                m.use_conv and m.interpolate and not m.use_conv_transpose and m.norm is None,
                f"{name}: upsampler not supported",
            )


def level_sizes(unet: UNet2DConditionModel, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial size of every U-Net level, finest first (what each stride-2 conv produces)."""
    sizes = [tuple(latent_size)]
    for block in unet.down_blocks:
        if block.downsamplers is not None:
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def cache_points(unet: UNet2DConditionModel) -> Iterator[tuple[str, str, nn.Module, int | None]]:
    """`(key, kind, module to hook, group-norm groups)` for everything an edit reads from a cache."""
    for name, m in unet.named_modules():
        if isinstance(m, ResnetBlock2D):
            yield f"{name}.norm1", NORM_INPUT, m.norm1, m.norm1.num_groups
            yield f"{name}.norm2", NORM_INPUT, m.norm2, m.norm2.num_groups
        elif isinstance(m, Transformer2DModel):
            yield f"{name}.norm", NORM_CELL_SUMS, m.norm, m.norm.num_groups
        elif isinstance(m, BasicTransformerBlock):
            yield f"{name}.attn1.to_k", ATTN_KEY, m.attn1.to_k, None
            yield f"{name}.attn1.to_v", ATTN_VALUE, m.attn1.to_v, None
        elif isinstance(m, Downsample2D):
            yield f"{name}.conv", DOWN_INPUT, m.conv, None
        elif isinstance(m, Upsample2D):
            yield name, UP_INPUT, m, None
    yield "conv_norm_out", NORM_INPUT, unet.conv_norm_out, unet.conv_norm_out.num_groups


def skip_sources(unet: UNet2DConditionModel) -> dict[str, str]:
    """For each up-block resnet, the cache point that already holds its skip connection.

    An up-block resnet's input is `cat([h, skip])`, and each skip is the input of the next layer on
    the down path (a resnet, a downsampler or the mid block), which the cache stores anyway: the
    resnet's own cache point keeps `h` only. Skips are pushed in down-path order and popped from the
    end, as in `UNet2DConditionModel.forward`."""
    pushed = []  # the cache point holding each skip, in push order
    for b, block in enumerate(unet.down_blocks):
        pushed += [f"down_blocks.{b}.resnets.{i}.norm1" for i in range(len(block.resnets))]
        if block.downsamplers is not None:
            pushed.append(f"down_blocks.{b}.downsamplers.0.conv")
    pushed.append("mid_block.resnets.0.norm1")
    sources = {}
    for u, block in enumerate(unet.up_blocks):
        for i in range(len(block.resnets)):
            sources[f"up_blocks.{u}.resnets.{i}.norm1"] = pushed.pop()
    return sources


def spatial_leaf_modules(unet: UNet2DConditionModel) -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules whose output may be a spatial map: all of the U-Net but the time embedding and
    the cross-attention keys/values (text tokens, not cells)."""
    for name, m in unet.named_modules():
        if next(m.children(), None) is not None:
            continue
        if name.startswith(("time_proj", "time_embedding")):
            continue
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            continue
        yield name, m


def tokens(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> token-major `[B, h*w, C]`."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
