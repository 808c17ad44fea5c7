"""Sparse operators, one module each, in plain PyTorch (Triton versions come beside them).

Installed as `fisedit_ray.kernels`. Layout convention: a feature map is token-major,
`[batch, cells, channels]`; a sparse map holds only its active cells, in the order of the
level's active-cell index.
"""

from fisedit_ray.kernels.attention import active_query_attention
from fisedit_ray.kernels.conv import sparse_conv2d
from fisedit_ray.kernels.gather import conv_input_positions, gather_plan, scatter_rows
from fisedit_ray.kernels.group_norm import group_norm_act, group_stats, group_sums

__all__ = [
    "active_query_attention",
    "conv_input_positions",
    "gather_plan",
    "group_norm_act",
    "group_stats",
    "group_sums",
    "scatter_rows",
    "sparse_conv2d",
]
