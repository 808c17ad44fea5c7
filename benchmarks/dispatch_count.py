"""Operations dispatched per U-Net step: dense diffusers, the eager sparse pass, and the sparse step
as a program (`StepProgram`, plans padded to buckets).

A program step dispatches its cache reads and records eagerly (counted like the eager pass, with a
`TorchDispatchMode`) and one call into the compiled program, inside which run the library kernels
(GEMMs, attention) and inductor's fused loops: counted from the program's generated code, a line
per call (the program is fixed: every step makes the same calls). Writes JSON.

    python benchmarks/dispatch_count.py --model scenes --compiled
    python benchmarks/dispatch_count.py --model sd15 --latent 64   # SD 1.5-shaped, random weights
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import re
from pathlib import Path

import torch
import torch._inductor.codecache
from diffusers import UNet2DConditionModel
from sd_shapes import SD15_UNET
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from unet_step import record

from fisedit_ray.masks import MaskPyramid, blob_mask
from fisedit_ray.models import load_pipeline
from fisedit_ray.sparse_unet import GatherPlans, Lane, SparseUNet
from fisedit_ray.step_program import StepProgram

# a call in a compiled program's wrapper: a fused loop, a library kernel, or an aten op
_KERNEL_CALL = re.compile(
    r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|torch\.ops\.[\w.]+|aten\.[\w.]+)\("
)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def counted(fn) -> int:
    with _Count() as count:
        fn()
    return count.total


def program_calls(modules: list) -> collections.Counter:
    """Calls made by the `call` functions of compiled programs' wrapper modules, by kind."""
    kinds = collections.Counter()
    for module in modules:
        if not hasattr(module, "call"):
            continue
        for line in inspect.getsource(module.call).splitlines():
            match = _KERNEL_CALL.match(line)
            if match:
                name = match.group(1)
                kinds["fused loops" if name.startswith(("cpp_fused", "triton_")) else "library kernels"] += 1
    return kinds


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["scenes", "sd15"], default="scenes")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: 32 scenes, 64 sd15)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.016, 0.05, 0.25])
    parser.add_argument("--compiled", action="store_true", help="compile the programs (minutes each)")
    parser.add_argument("--out", type=Path, default=Path("results/dispatch_count"))
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "scenes":
        unet, latent = load_pipeline("scenes").unet.eval(), args.latent or 32
    else:
        unet, latent = UNet2DConditionModel(**SD15_UNET).eval(), args.latent or 64
    size = (latent, latent)
    sample = torch.randn(2, unet.config.in_channels, *size)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor(500)
    cache, sparse_unet = record(unet, sample, t, text)
    dense = counted(lambda: unet(sample, t, encoder_hidden_states=text))
    print(f"{args.model} {size}: dense step {dense} operations", flush=True)
    program_unet = SparseUNet(unet, packed=not args.compiled)  # a compiled program's weights are plain
    rows = []
    for ratio in args.ratios:
        pyramid = MaskPyramid.build(blob_mask(size, ratio, seed=0), cache.sizes)
        edited = sample + 0.1 * torch.randn(sample.shape)
        row = {"model": args.model, "latent": latent, "mask_ratio": pyramid.ratio, "dense_ops": dense}
        for padded in (False, True):
            plans, scratch = GatherPlans(pyramid, sample.device, padded=padded), {}

            def lanes(edited=edited, plans=plans, scratch=scratch):
                return [Lane(edited, t, text, cache.reader(0), plans, {}, cache, scratch=scratch)]

            if not padded:
                sparse_unet.run_lanes(lanes())  # the pass's first step prepares its plans
                row["sparse_eager_ops"] = counted(lambda: sparse_unet.run_lanes(lanes()))
                continue
            program = StepProgram(program_unet, compiled=args.compiled)
            inner = program._program

            def uncounted(*a, inner=inner):  # the program's own calls are counted from its code
                with _disable_current_modes():
                    return inner(*a)

            program.run(lanes())  # first step: eager, logging its reads
            before = list(torch._inductor.codecache.PyCodeCache.modules)
            program.run(lanes())  # compiles where compiled
            new = [m for m in torch._inductor.codecache.PyCodeCache.modules if m not in before]
            program._program = uncounted
            row["program_outside_ops"] = counted(lambda program=program: program.run(lanes()))
            if args.compiled:
                calls = program_calls(new)
                row["program_library_calls"] = calls["library kernels"]
                row["program_fused_loops"] = calls["fused loops"]
                row["program_ops"] = row["program_outside_ops"] + sum(calls.values())
                row["compile_s"] = program.compile_seconds
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dispatch_{args.model}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
