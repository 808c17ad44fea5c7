"""Sparse operators, one module each, in plain PyTorch (Triton versions will sit beside them).

Installed as `fisedit_ray.kernels`. Layout convention: a feature map is token-major,
`[batch, cells, channels]`; a sparse map holds only its active cells, in the order of the level's
active-cell index.

This file must stay free of imports: run from the repository root, transformers probes for the
unrelated `kernels` package and imports this folder under that name; an empty module reads to it
as "not installed", while imports here would start a circular import of transformers.
"""
