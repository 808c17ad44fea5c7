"""Sparse operators, one module each: plain PyTorch, with the Triton versions beside them
(`triton_*.py`) for CUDA tensors.

Layout convention: a feature map is token-major, `[batch, cells, channels]`; a sparse map holds only
its active cells, in the order of the level's active-cell index.

This folder lives inside `fisedit_ray/` so that no top-level `kernels` is importable from the
repository root: that name belongs to Hugging Face's `kernels` package, a dependency of
transformers, which diffusers and transformers import.
"""
