"""Train the scenes model from scratch: a Stable Diffusion-architecture VAE, U-Net and CLIP text
encoder on the synthetic scenes world. One command, fixed seeds, resumable, on a CPU or a GPU:

    fisedit train --out out/train-scenes --minutes 100                 # 2-core CPU
    fisedit train --out out/train-scenes --minutes 6 --batch-size 256  # one GPU (bf16 autocast)

Stage 1 trains the autoencoder (64 x 64 images -> 32 x 32 x 4 latents), stage 2 the U-Net and text
encoder together on the frozen autoencoder's latents (v-prediction with min-SNR loss weights, see
`loss_weights`; 10% empty captions for classifier-free guidance; EMA weights). Scenes are rendered on
the fly, batched on the training device. Checkpoints land in the output folder every few minutes; a
rerun with the same folder resumes; `--init FOLDER` fine-tunes an exported model instead of starting
from scratch. The result is a diffusers folder (`model/`) plus `losses.json` and `losses.png`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.training_utils import EMAModel, compute_snr
from transformers import CLIPTextModel

from fisedit_ray.models import (
    SD_SCHEDULER_CONFIG,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    quiet_libraries,
)
from fisedit_ray.scenes import cell_tokens, random_scene, render_batch, vocabulary

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 96, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
    mid_block_add_attention=False,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
MAX_TOKENS = 32
# called as training goes with (stage, done, total), for progress bars: stage 1 (the autoencoder)
# counts its steps, stage 2 (U-Net and text encoder) the seconds of its budget, or its steps where
# `max_steps` is set
TrainProgress = Callable[[str, float, float], None]
STAGE_1, STAGE_2 = "stage 1: autoencoder", "stage 2: U-Net and text encoder"


@dataclass
class TrainConfig:
    out: str = "out/train-scenes"
    minutes: float = 100.0  # wall-clock budget of stage 2
    max_steps: int | None = None  # and/or a step budget
    vae_steps: int = 800
    batch_size: int = 32
    vae_lr: float = 1e-3
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    object_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # relative frequency of 0, 1, 2, 3 objects
    ema_decay: float = 0.999
    prediction_type: str = "v_prediction"  # or "epsilon"
    snr_gamma: float = 5.0
    init: str | None = None  # a diffusers folder to start from (its VAE, U-Net and text encoder)
    checkpoint_minutes: float = 5.0
    seed: int = 0
    device: str = "auto"  # "cuda" when available, else "cpu"
    precision: str = "auto"  # "bf16" autocast on a GPU or a CPU with bf16 instructions, else "fp32"


def scene_batch(
    rng: random.Random, size: int, device="cpu", object_weights: Sequence[float] = (1, 1, 1, 1)
) -> tuple[torch.Tensor, list[str]]:
    """`size` random scenes, `object_weights[n]` the relative frequency of scenes with n objects:
    images in [-1, 1] on `device`, and their captions."""
    counts = rng.choices(range(len(object_weights)), weights=object_weights, k=size)
    scenes = [random_scene(rng.randrange(2**62), n, n) for n in counts]
    images = render_batch(scenes, device=device).float() / 127.5 - 1.0
    return images, [s.caption for s in scenes]


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX); elsewhere bf16 is emulated
    and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(cfg: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None: plain float32)."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if cfg.precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
    else:
        precision = cfg.precision
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', not {precision!r}")
    return device, torch.bfloat16 if precision == "bf16" else None


def loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of the prediction MSE. Both objectives weigh the clean-latent error by
    min(SNR, gamma) (min-SNR); v-prediction adds 1, so the high-noise steps, where the layout and the
    caption's binding are decided, are not discounted to nothing (epsilon's weight there is SNR ~ 0)."""
    snr = compute_snr(scheduler, t)
    if scheduler.config.prediction_type == "v_prediction":
        return (snr.clamp(max=gamma) + 1) / (snr + 1)
    return snr.clamp(max=gamma) / snr


def train_vae(cfg: TrainConfig, out: Path, log, progress: TrainProgress | None = None) -> AutoencoderKL:
    device, autocast = resolve(cfg)
    if cfg.init:
        log(f"stage 1: autoencoder from {cfg.init}")
        with quiet_libraries():
            return AutoencoderKL.from_pretrained(cfg.init, subfolder="vae", torch_dtype=torch.float32).to(
                device
            )
    path = out / "vae"
    if (path / "config.json").exists():
        log(f"stage 1: autoencoder found in {path}")
        with quiet_libraries():
            return AutoencoderKL.from_pretrained(path).to(device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    losses = []
    for step in range(cfg.vae_steps):
        images, _ = scene_batch(rng, cfg.batch_size, device)
        with torch.autocast(device.type, autocast, enabled=autocast is not None):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon.float(), images) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(STAGE_1, step + 1, cfg.vae_steps)
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"stage 1: step {step} loss {np.mean(losses[-100:]):.5f}")
    vae.eval()
    with torch.no_grad():  # SD convention: scale latents to unit variance
        images, _ = scene_batch(random.Random(cfg.seed + 1), 256, device)
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(path)
    (out / "vae_losses.json").write_text(json.dumps(losses))
    return vae


def denoiser(cfg: TrainConfig, tokenizer) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """A fresh U-Net and text encoder, or those of `cfg.init`."""
    if not cfg.init:
        return UNet2DConditionModel(**UNET_CONFIG), build_text_encoder(tokenizer, **TEXT_CONFIG)
    with quiet_libraries():
        unet = UNet2DConditionModel.from_pretrained(cfg.init, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(cfg.init, subfolder="text_encoder", dtype=torch.float32)
    known = text_encoder.config.vocab_size
    if known > len(tokenizer):
        raise ValueError(f"{cfg.init}: its text encoder does not match the scenes vocabulary")
    if known < len(tokenizer):
        extend_vocabulary(text_encoder, tokenizer, known)
    return unet, text_encoder


def extend_vocabulary(text_encoder: CLIPTextModel, tokenizer, known: int) -> None:
    """Grow a trained encoder to a vocabulary whose first `known` tokens it knows: a new token (such
    as "top_left") starts as the mean embedding of the known words it joins."""
    table = text_encoder.get_input_embeddings().weight.data
    text_encoder.resize_token_embeddings(len(tokenizer))
    grown = text_encoder.get_input_embeddings().weight.data
    for token_id in range(known, len(tokenizer)):
        words = tokenizer.convert_ids_to_tokens(token_id).split("_")
        ids = tokenizer.convert_tokens_to_ids(words)
        if any(i >= known for i in ids):
            raise ValueError(f"new token {words!r} is not made of known words")
        grown[token_id] = table[ids].mean(dim=0)


def train(cfg: TrainConfig, log=print, progress: TrainProgress | None = None) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    device, autocast = resolve(cfg)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    log(f"training on {device} ({'float32' if autocast is None else 'bfloat16 autocast'})")
    torch.manual_seed(cfg.seed)
    vae = train_vae(cfg, out, log, progress).requires_grad_(False)
    tokenizer = build_tokenizer(MAX_TOKENS, vocabulary(), cell_tokens())
    unet, text_encoder = (m.to(device) for m in denoiser(cfg, tokenizer))
    if device.type == "cpu" and autocast is not None:
        # PyTorch's CPU flash-attention backward in bf16 is ~6x slower than in float32; the classic
        # matmul-softmax attention keeps bf16 training 1.6x faster than float32 (measured, 2 cores).
        unet.set_attn_processor(AttnProcessor())
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=cfg.ema_decay, foreach=True)
    noise_scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG, prediction_type=cfg.prediction_type)
    state = {"step": 0, "seconds": 0.0, "losses": []}
    rng = random.Random(cfg.seed + 2)
    generator = torch.Generator(device).manual_seed(cfg.seed + 3)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
        opt.load_state_dict(saved["opt"])
        for ema, key in ((ema_unet, "ema_unet"), (ema_text, "ema_text")):
            ema.load_state_dict(saved[key])
            ema.to(device)
        state = saved["state"]
        rng.setstate(saved["rng"])
        generator.set_state(saved["generator"])
        log(f"stage 2: resumed at step {state['step']} ({state['seconds'] / 60:.1f} min done)")

    def save_checkpoint():
        torch.save(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "state": state,
                "rng": rng.getstate(),
                "generator": generator.get_state(),
            },
            checkpoint.with_suffix(".tmp"),
        )
        checkpoint.with_suffix(".tmp").replace(checkpoint)

    budget = cfg.minutes * 60
    last_checkpoint = time.perf_counter()
    while state["seconds"] < budget and (cfg.max_steps is None or state["step"] < cfg.max_steps):
        start = time.perf_counter()
        images, captions = scene_batch(rng, cfg.batch_size, device, cfg.object_weights)
        captions = ["" if rng.random() < cfg.caption_dropout else c for c in captions]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        with torch.autocast(device.type, autocast, enabled=autocast is not None):
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.mean.float() * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator, device=device)
            t = torch.randint(0, len(noise_scheduler), (len(latents),), generator=generator, device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids.to(device))[0]).sample
        target = (
            noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
        )
        mse = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (mse * loss_weights(noise_scheduler, t, cfg.snr_gamma)).mean()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (state["step"] + 1) / cfg.warmup)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        state["losses"].append(mse.mean().item())  # the plain prediction MSE
        state["step"] += 1
        state["seconds"] += time.perf_counter() - start
        if progress is not None and cfg.max_steps is not None:
            progress(STAGE_2, state["step"], cfg.max_steps)
        elif progress is not None:
            progress(STAGE_2, min(state["seconds"], budget), budget)
        if state["step"] % 100 == 0:
            recent = np.mean(state["losses"][-100:])
            log(f"stage 2: step {state['step']} loss {recent:.4f} ({state['seconds'] / 60:.1f} min)")
        if time.perf_counter() - last_checkpoint > cfg.checkpoint_minutes * 60:
            save_checkpoint()
            last_checkpoint = time.perf_counter()
    save_checkpoint()
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    scheduler = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG, prediction_type=cfg.prediction_type)
    model_dir = export(out / "model", unet.cpu(), vae.cpu(), text_encoder.cpu(), tokenizer, scheduler)
    write_loss_report(out, state, cfg.prediction_type)
    log(f"done: {state['step']} steps in {state['seconds'] / 60:.1f} min; model in {model_dir}")
    return model_dir


def export(path: Path, unet, vae, text_encoder, tokenizer, scheduler) -> Path:
    """A diffusers Stable Diffusion folder, weights in float16 to keep the package small."""
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler)
    with quiet_libraries():  # diffusers warns about casting (no module needs float32) and draws a bar
        pipe.to(torch.float16).save_pretrained(path)
        pipe.to(torch.float32)
    return path


def write_loss_report(out: Path, state: dict, prediction_type: str) -> None:
    losses = state["losses"]
    report = {
        "steps": state["step"],
        "seconds": state["seconds"],
        "target": prediction_type,
        "losses": losses,
    }
    (out / "losses.json").write_text(json.dumps(report))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 100)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.25, label="loss")
    ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{prediction_type} MSE")
    ax.set_title(f"scenes model: {state['step']} steps, {state['seconds'] / 60:.0f} min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=120)
    plt.close(fig)
