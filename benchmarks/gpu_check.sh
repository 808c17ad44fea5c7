#!/usr/bin/env bash
# Everything a lent GPU machine should check, in one call: the tests that need a GPU (Triton kernels
# compiled for real instead of interpreted; caches in host memory read over a side stream), then the
# U-Net step (fp32 and bf16, 64x64 latent) and whole-edit benchmarks on CUDA, caches in GPU memory
# and in host memory, the whole edit with compiled step programs (CUDA graphs) against compiled
# diffusers. Results (Parquet, plots, logs) go under $OUT, or results/gpu.
#
#     pip install -e ".[test]"   # over the machine's CUDA build of torch (no constraints.txt)
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q -x tests/test_triton_kernels.py tests/test_cache.py tests/test_sparse_edit.py tests/test_step_program.py 2>&1 | tee "$out/tests.log"
python benchmarks/unet_step.py --device cuda --latent 64 --out "$out" 2>&1 | tee "$out/unet_step_fp32.log"
python benchmarks/unet_step.py --device cuda --latent 64 --dtype bfloat16 --out "$out" 2>&1 | tee "$out/unet_step_bf16.log"
python benchmarks/whole_edit.py --device cuda --compiled --out "$out/gpu_caches" 2>&1 | tee "$out/whole_edit.log"
python benchmarks/whole_edit.py --device cuda --cache-device cpu --out "$out/host_caches" 2>&1 | tee "$out/whole_edit_host.log"
