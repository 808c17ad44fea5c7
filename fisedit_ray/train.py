"""Train the scenes model from scratch: a Stable Diffusion-architecture VAE, U-Net and CLIP text
encoder on the synthetic scenes world. One command, fixed seeds, resumable, CPU-friendly:

    fisedit train --out out/train-scenes --minutes 100

Stage 1 trains the autoencoder (64 x 64 images -> 32 x 32 x 4 latents), stage 2 the U-Net and text
encoder together on the frozen autoencoder's latents (epsilon prediction, 10% empty captions for
classifier-free guidance, EMA weights). Checkpoints land in the output folder every few minutes; a
rerun with the same folder resumes. The result is a diffusers folder (`model/`) plus `losses.json`
and `losses.png`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel

from fisedit_ray.models import SD_SCHEDULER_CONFIG, assemble_pipeline, build_text_encoder, build_tokenizer
from fisedit_ray.scenes import random_scene, vocabulary

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
    ema_decay: float = 0.999
    checkpoint_minutes: float = 5.0
    seed: int = 0


def scene_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [random_scene(rng.randrange(2**62)) for _ in range(size)]
    images = np.stack([np.asarray(s.render()) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2), [s.caption for s in scenes]


def train_vae(cfg: TrainConfig, out: Path, log) -> AutoencoderKL:
    path = out / "vae"
    if (path / "config.json").exists():
        log(f"stage 1: autoencoder found in {path}")
        return AutoencoderKL.from_pretrained(path)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    losses = []
    for step in range(cfg.vae_steps):
        images, _ = scene_batch(rng, cfg.batch_size)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"stage 1: step {step} loss {np.mean(losses[-100:]):.5f}")
    vae.eval()
    with torch.no_grad():  # SD convention: scale latents to unit variance
        images, _ = scene_batch(random.Random(cfg.seed + 1), 256)
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(path)
    (out / "vae_losses.json").write_text(json.dumps(losses))
    return vae


def train(cfg: TrainConfig, log=print) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    vae = train_vae(cfg, out, log).requires_grad_(False)
    tokenizer = build_tokenizer(MAX_TOKENS, vocabulary())
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = build_text_encoder(tokenizer, **TEXT_CONFIG)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=cfg.ema_decay)
    noise_scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    state = {"step": 0, "seconds": 0.0, "losses": []}
    rng = random.Random(cfg.seed + 2)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
        opt.load_state_dict(saved["opt"])
        ema_unet.load_state_dict(saved["ema_unet"])
        ema_text.load_state_dict(saved["ema_text"])
        state = saved["state"]
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
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
                "torch_rng": torch.get_rng_state(),
            },
            checkpoint.with_suffix(".tmp"),
        )
        checkpoint.with_suffix(".tmp").replace(checkpoint)

    budget = cfg.minutes * 60
    last_checkpoint = time.perf_counter()
    while state["seconds"] < budget and (cfg.max_steps is None or state["step"] < cfg.max_steps):
        start = time.perf_counter()
        images, captions = scene_batch(rng, cfg.batch_size)
        captions = ["" if rng.random() < cfg.caption_dropout else c for c in captions]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (state["step"] + 1) / cfg.warmup)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        state["losses"].append(loss.item())
        state["step"] += 1
        state["seconds"] += time.perf_counter() - start
        if state["step"] % 100 == 0:
            recent = np.mean(state["losses"][-100:])
            log(f"stage 2: step {state['step']} loss {recent:.4f} ({state['seconds'] / 60:.1f} min)")
        if time.perf_counter() - last_checkpoint > cfg.checkpoint_minutes * 60:
            save_checkpoint()
            last_checkpoint = time.perf_counter()
    save_checkpoint()
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    model_dir = export(out / "model", unet, vae, text_encoder, tokenizer)
    write_loss_report(out, state)
    log(f"done: {state['step']} steps in {state['seconds'] / 60:.1f} min; model in {model_dir}")
    return model_dir


def export(path: Path, unet, vae, text_encoder, tokenizer) -> Path:
    """A diffusers Stable Diffusion folder, weights in float16 to keep the package small."""
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.to(torch.float16).save_pretrained(path)
    pipe.to(torch.float32)
    return path


def write_loss_report(out: Path, state: dict) -> None:
    losses = state["losses"]
    (out / "losses.json").write_text(
        json.dumps({"steps": state["step"], "seconds": state["seconds"], "losses": losses})
    )
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
    ax.set_ylabel("epsilon MSE")
    ax.set_title(f"scenes model: {state['step']} steps, {state['seconds'] / 60:.0f} min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=120)
    plt.close(fig)
