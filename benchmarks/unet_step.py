"""One U-Net step, sparse vs dense, on a Stable Diffusion 1.5-shaped U-Net with random weights.

Classifier-free guidance (batch 2), compact blob masks of SIGE's edit ratios (1.6, 4.8, 11.8, 25%)
and FISEdit's (5, 15, 30%). For each mask: the dense diffusers forward and the sparse forward over a
cache recorded from one dense step, timed in rounds (a warm-up round, then --repeats rounds, each
timing dense once and then every mask's sparse step once, each after an untimed run of itself; times
are medians over the rounds, and a speed-up is the median of its rounds' dense/sparse ratios, so
that a slow spell of a shared machine slows both sides of a ratio), the MACs each actually executed,
and efficiency = time speed-up / MACs reduction. `weight_stream_s` is the time of reading every
weight once (one GEMM of one active cell per layer), a floor for any sparse step. Call by call
(CPU): `gemm_s` is the time of the sparse step's GEMMs (each call timed on its own, in a median
step), `gemm_pace_s` what they would take at the dense step's pace unless streaming the weight takes
longer (the sum of max(weight bytes at the streaming rate, MACs at the dense step's MAC rate); GEMMs
of many rows beat it, those of a few rows hardly can), `attention_s` the attention calls (PyTorch's
fused CPU attention), and `rest_s` everything else in that step. `efficiency_library` is the
efficiency the step would have if nothing but its GEMMs and attention calls took time: what the
library kernels allow, however small the rest is made; `efficiency_pace` the same with every GEMM
and attention call at its pace (attention: its MACs at the dense step's rate), a step of library
calls as fast as dense ones and nothing else. In bfloat16 it also reports how far the outputs are
from float32: sparse bf16 against sparse fp32 (itself equal to the masked-dense reference, see the
tests), next to dense bf16 against dense fp32 as the yardstick.

With `--lanes K`, K edits of each ratio (each its own blob, input and scratch) run as one pass, as
the service's batcher runs edits of similar sparsity (`SparseUNet.run_lanes`: every GEMM once for
all of them, so a deep layer's weight is read once for K edits' rows), against diffusers on the
same K guidance batches as one batch of 2K.
With `--compiled`, each mask's step also runs as a compiled step program (`StepProgram`, plans
padded to buckets) in the same rounds: `compiled_s`, `compiled_speedup`, `compiled_efficiency`
(against the unpadded step's MACs reduction: the padding's extra rows count as overhead) and the
program's `compile_s`.
Writes Parquet and a PNG plot.

    python benchmarks/unet_step.py --latent 64
    python benchmarks/unet_step.py --latent 64 --ratios 0.016 --compiled
    python benchmarks/unet_step.py --latent 64 --dtype bfloat16
    python benchmarks/unet_step.py --latent 64 --lanes 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import UNet2DConditionModel
from sd_shapes import SD15_UNET
from timing import interleaved_seconds, median_seconds, round_ratios
from torch import nn

from fisedit_ray.cache import ActivationCache, CacheRecorder
from fisedit_ray.kernels.attention import active_query_attention
from fisedit_ray.kernels.linear import linear
from fisedit_ray.macs import count_macs
from fisedit_ray.masks import MaskPyramid, blob_mask
from fisedit_ray.sparse_unet import GatherPlans, Lane, SparseUNet
from fisedit_ray.step_program import StepProgram


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.016, 0.048, 0.118, 0.25, 0.05, 0.15, 0.30]
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lanes", type=int, default=1, help="edits of each ratio run in one pass")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton kernels)")
    parser.add_argument("--compiled", action="store_true", help="also each step as a compiled program")
    parser.add_argument("--out", type=Path, default=Path("results/unet_step"))
    args = parser.parse_args()
    if args.lanes < 1:
        parser.error(f"--lanes must be at least 1, not {args.lanes}")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    device = torch.device(args.device)
    unet32 = UNet2DConditionModel(**SD15_UNET).eval()
    unet = unet32 if dtype == torch.float32 else UNet2DConditionModel(**SD15_UNET).to(dtype).eval()
    unet.load_state_dict(unet32.state_dict())
    unet32, unet = unet32.to(device), unet.to(device)
    size = (args.latent, args.latent)
    sample = torch.randn(2, 4, *size).to(device)
    text = torch.randn(2, 77, 768).to(device)
    t = torch.tensor(500, device=device)
    cache, sparse_unet = record(unet, sample.to(dtype), t, text.to(dtype))
    step_bytes = cache.byte_stats()["per_step"][0]
    if dtype != torch.float32:  # the float32 yardstick
        cache32, sparse32 = record(unet32, sample, t, text)
        dense32 = unet32(sample, t, encoder_hidden_states=text).sample
        dense_error = (unet(sample.to(dtype), t, encoder_hidden_states=text.to(dtype)).sample - dense32).abs()
    sample, text = sample.to(dtype), text.to(dtype)
    batch_sample, batch_text = sample.repeat(args.lanes, 1, 1, 1), text.repeat(args.lanes, 1, 1)

    def dense():  # the lanes' guidance batches as one batch
        return unet(batch_sample, t, encoder_hidden_states=batch_text).sample

    _, dense_macs = count_macs(dense)
    stream_s = weight_stream_seconds(sparse_unet, sample, args.repeats)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in gemm_layers(unet))
    masks = {}  # each ratio (the lanes' mean): its lanes' plans, edited inputs, and the sparse step
    for ratio in args.ratios:
        lanes = []
        for seed in range(args.lanes):
            pyramid = MaskPyramid.build(blob_mask(size, ratio, seed=seed), cache.sizes)
            edited = sample + 0.1 * torch.randn(sample.shape).to(device, dtype)
            scratch = {}  # kept from step to step, as an edit keeps it
            lanes.append((GatherPlans(pyramid, sample.device), edited, scratch))

        def sparse(lanes=lanes):
            return sparse_unet.run_lanes(
                [Lane(x, t, text, cache.reader(0, device, dtype), p, scratch=s) for p, x, s in lanes]
            )

        masks[statistics.mean(p.pyramid.ratio for p, _, _ in lanes)] = (lanes, sparse)
    programs = {}  # each ratio's step as a compiled program over padded plans, compiled here
    program_unet = SparseUNet(unet, packed=False)  # its own weights: a program's are plain
    for ratio, (lanes, _) in masks.items() if args.compiled else ():
        program = StepProgram(program_unet)
        padded = [(GatherPlans(p.pyramid, sample.device, padded=True), x, {}) for p, x, _ in lanes]

        def compiled(program=program, padded=padded):
            return program.run(
                [Lane(x, t, text, cache.reader(0, device, dtype), p, scratch=s) for p, x, s in padded]
            )

        compiled()  # the pass's first step: eager, logging its reads
        compiled()  # compiles
        programs[("compiled", ratio)] = (compiled, program)
    # dense and every mask's sparse step in rounds: each speed-up is the median of its rounds' ratios
    steps = {
        "dense": dense,
        **{r: m[1] for r, m in masks.items()},
        **{k: c for k, (c, _) in programs.items()},
    }
    times = interleaved_seconds(steps, args.repeats)
    dense_s = statistics.median(times["dense"])
    print(f"dense {dense_s:.3f}s; reading every weight once takes {stream_s:.3f}s")
    rows = []
    for mask_ratio, (lanes, sparse) in masks.items():
        _, sparse_macs = count_macs(sparse)
        sparse_s = statistics.median(times[mask_ratio])
        speedup = round_ratios(times["dense"], times[mask_ratio])
        columns = ("gemm_s", "gemm_pace_s", "attention_s", "attention_pace_s", "rest_s")
        gemms = dict.fromkeys(columns, float("nan"))
        if device.type == "cpu":
            gemms = gemm_breakdown(sparse, weight_bytes / stream_s, dense_macs / dense_s, args.repeats)
        library_s = gemms["gemm_s"] + gemms["attention_s"]
        pace_s = gemms["gemm_pace_s"] + gemms["attention_pace_s"]
        row = {
            "latent": args.latent,
            "dtype": args.dtype,
            "lanes": args.lanes,
            "mask_ratio": mask_ratio,
            "dense_s": dense_s,
            "sparse_s": sparse_s,
            "speedup": speedup,
            "macs_dense": dense_macs,
            "macs_sparse": sparse_macs,
            "macs_reduction": dense_macs / sparse_macs,
            "efficiency": speedup / (dense_macs / sparse_macs),
            "weight_stream_s": stream_s,
            **gemms,
            "efficiency_library": (dense_s / library_s) / (dense_macs / sparse_macs),
            "efficiency_pace": (dense_s / pace_s) / (dense_macs / sparse_macs),
            "cache_bytes_per_step": step_bytes,
            **compiled_columns(times, mask_ratio, programs, dense_macs / sparse_macs),
            "threads": args.threads,
            "repeats": args.repeats,
        }
        if dtype != torch.float32:
            errors = [
                (out.float() - sparse32(x.float(), t, text.float(), cache32.reader(0, device), p)).abs().max()
                for out, (p, x, _) in zip(sparse(), lanes, strict=True)
            ]
            row["sparse_max_abs_error_vs_fp32"] = max(errors).item()
            row["dense_max_abs_error_vs_fp32"] = dense_error.max().item()
            row["fp32_output_max_abs"] = dense32.abs().max().item()
        rows.append(row)
        print(
            f"mask {row['mask_ratio']:6.1%} x{args.lanes}  dense {dense_s:7.3f}s  sparse {sparse_s:7.3f}s  "
            f"speed-up {row['speedup']:5.2f}x  MACs {row['macs_reduction']:5.2f}x  "
            f"efficiency {row['efficiency']:.2f} (library calls at dense pace {row['efficiency_pace']:.2f})  "
            f"GEMMs {row['gemm_s']:.3f}s (at dense pace {row['gemm_pace_s']:.3f}s), "
            f"attention {row['attention_s']:.3f}s (efficiency at these two alone "
            f"{row['efficiency_library']:.2f}), rest {row['rest_s']:.3f}s"
            + (
                f"  compiled {row['compiled_s']:.3f}s, {row['compiled_speedup']:.2f}x, efficiency "
                f"{row['compiled_efficiency']:.2f} (compile {row['compile_s']:.0f}s)"
                if args.compiled
                else ""
            )
            + (
                f"  |err| vs fp32: sparse {row['sparse_max_abs_error_vs_fp32']:.3g}, "
                f"dense {row['dense_max_abs_error_vs_fp32']:.3g}"
                if dtype != torch.float32
                else ""
            ),
            flush=True,
        )
    print(
        f"cache per step: {step_bytes / 2**20:.1f} MiB ({args.dtype}, batch 2, {args.latent}x{args.latent})"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"unet_step_{args.latent}_{args.dtype}" + (f"_lanes{args.lanes}" if args.lanes > 1 else "")
    pq.write_table(pa.Table.from_pylist(rows), args.out / f"{stem}.parquet")
    plot(rows, args.out / f"{stem}.png")


def gemm_layers(unet: nn.Module) -> list[nn.Linear | nn.Conv2d]:
    """The layers whose weights a step multiplies by its rows (linears, 1x1 and k x k convs)."""
    return [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def weight_stream_seconds(sparse_unet: SparseUNet, sample: torch.Tensor, repeats: int) -> float:
    """Median time of one GEMM per weight matrix (linears, 1x1 convs, k x k convs, prepared as the
    sparse pass reads them) over the rows of one cell in a guidance batch."""
    layers = gemm_layers(sparse_unet.unet)
    weights = [sparse_unet.gemm_weight(m) for m in layers]
    rows = [torch.randn(sample.shape[0], m.weight[0].numel()).to(m.weight) for m in layers]

    def stream():
        for x, w in zip(rows, weights, strict=True):
            linear(x, w)

    return median_seconds(stream, repeats)


def gemm_breakdown(step, stream_bytes_per_s: float, macs_per_s: float, repeats: int) -> dict:
    """The GEMMs and attention calls of the median of `repeats` runs of `step`, and their pace (see
    the module docstring). Times each call of `kernels.linear.linear` and
    `kernels.attention.active_query_attention` by wrapping them where the sparse pass looks them
    up (a CPU's calls are synchronous; on a GPU the caller leaves the columns NaN)."""
    import fisedit_ray.kernels.conv as conv_module
    import fisedit_ray.sparse_unet as sparse_module

    calls, attention_calls = [], []

    def timed_attention(q, k, v, heads):
        start = time.perf_counter()
        out = active_query_attention(q, k, v, heads)
        seconds = time.perf_counter() - start
        macs = 2 * q.numel() * k.shape[1]  # scores and weighted sum, each over all channels
        attention_calls.append((seconds, macs / macs_per_s))
        return out

    def timed(x, weight, bias=None):
        start = time.perf_counter()
        out = linear(x, weight, bias)
        seconds = time.perf_counter() - start
        rows, k, n = x.numel() // x.shape[-1], x.shape[-1], out.shape[-1]
        pace = max(k * n * x.element_size() / stream_bytes_per_s, rows * k * n / macs_per_s)
        calls.append((seconds, pace))
        return out

    runs = []
    conv_module.linear = sparse_module.linear = timed
    sparse_module.active_query_attention = timed_attention
    try:
        for _ in range(repeats):
            calls.clear()
            attention_calls.clear()
            start = time.perf_counter()
            step()
            total = time.perf_counter() - start
            gemm, pace = sum(c[0] for c in calls), sum(c[1] for c in calls)
            attention, attention_pace = (sum(c[i] for c in attention_calls) for i in (0, 1))
            runs.append((total, gemm, pace, attention, attention_pace))
    finally:
        conv_module.linear = sparse_module.linear = linear
        sparse_module.active_query_attention = active_query_attention
    total, gemm, pace, attention, attention_pace = sorted(runs)[len(runs) // 2]
    return {
        "gemm_s": gemm,
        "gemm_pace_s": pace,
        "attention_s": attention,
        "attention_pace_s": attention_pace,
        "rest_s": total - gemm - attention,
    }


def compiled_columns(times: dict, ratio: float, programs: dict, macs_reduction: float) -> dict:
    """The compiled program's columns of a mask's row (none without `--compiled`)."""
    if ("compiled", ratio) not in programs:
        return {}
    speedup = round_ratios(times["dense"], times["compiled", ratio])
    return {
        "compiled_s": statistics.median(times["compiled", ratio]),
        "compiled_speedup": speedup,
        "compiled_efficiency": speedup / macs_reduction,
        "compile_s": programs["compiled", ratio][1].compile_seconds,
    }


def record(unet, sample, t, text) -> tuple[ActivationCache, SparseUNet]:
    """A one-step cache of a dense forward, and the sparse runner of `unet`."""
    sparse_unet = SparseUNet(unet)
    cache = ActivationCache(sample.dtype, sparse_unet.level_sizes(tuple(sample.shape[-2:])))
    recorder = CacheRecorder(unet, cache)
    recorder.begin_step()
    unet(sample, t, encoder_hidden_states=text)
    recorder.end_step()
    recorder.remove()
    return cache, sparse_unet


def plot(rows: list[dict], path: Path) -> None:
    rows = sorted(rows, key=lambda r: r["mask_ratio"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [100 * r["mask_ratio"] for r in rows]
    ax.plot(x, [r["speedup"] for r in rows], "o-", label="time speed-up")
    ax.plot(x, [r["macs_reduction"] for r in rows], "s--", label="MACs reduction")
    ax.set_xlabel("mask ratio (%)")
    ax.set_ylabel("x over dense diffusers")
    ax.set_title(
        f"SD1.5-shaped U-Net step, {rows[0]['latent']}x{rows[0]['latent']} latent, {rows[0]['dtype']}"
        + (f", {rows[0]['lanes']} edits per pass" if rows[0]["lanes"] > 1 else "")
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
