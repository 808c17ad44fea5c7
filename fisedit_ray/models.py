"""Model loading: the embedded models, local diffusers folders, and hub ids on a user's machine.

"scenes" (the default) is the model trained by `fisedit_ray.train` on the synthetic scenes world,
shipped in the package as a diffusers folder. "tiny" / "tiny-sd2" are built from explicit configs
with seeded (untrained) weights, for tests. None of them downloads anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers.utils.logging as diffusers_logging
import huggingface_hub.utils as hub_utils
import torch
import transformers.utils.logging as transformers_logging
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from fisedit_ray.scenes import vocabulary as scenes_vocabulary

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

DEFAULT_MODEL = "scenes"
SCENES_MODEL_DIR = Path(__file__).parent / "weights" / "scenes"

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"

# The words of the synthetic scenes grammar plus common prompt words; anything else maps to <unk>.
VOCABULARY = """
a an the and at of in on with under over near by to from is are this that it its
top bottom left right center middle corner background foreground
red green blue yellow purple white black orange pink brown gray grey
circle square triangle star heart cross ring dot shape object objects
small big large tiny huge bright dark light
cabin house tree trees woods forest mountain mountains lake river sea sky sun moon stars
fireworks snow rain night day sunset sunrise cat dog bird car boat person people city street
photo painting drawing picture style
""".split()

# Explicit configs of the embedded models. "sd1" mirrors Stable Diffusion 1.x (conv projections, one
# head size), "sd2" mirrors 2.x (linear projections, per-level head sizes, three levels).
TINY_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "sd2": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 48, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(4, 8, 8),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=16,
    ),
}

TINY_VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)

SD_SCHEDULER_CONFIG: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_tokenizer(
    max_length: int = 77, words: list[str] | None = None, phrases: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-splitting word-level tokenizer over `words` (default VOCABULARY).
    `phrases` maps multi-word names to the one token each stands for (e.g. "top left" -> "top_left")."""
    words = VOCABULARY if words is None else words
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    joins = [normalizers.Replace(name, token) for name, token in (phrases or {}).items()]
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *joins])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
    )


def build_tiny_pipeline(variant: str = "sd1", seed: int = 0, scheduler=None) -> StableDiffusionPipeline:
    """The embedded model: deterministic configs and seeded weights; identical on every machine."""
    if variant not in TINY_UNET_CONFIGS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {sorted(TINY_UNET_CONFIGS)}")
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIGS[variant])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = build_text_encoder(
        tokenizer, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4
    )
    return assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler)


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, **sizes: int) -> CLIPTextModel:
    """A CLIP text encoder (random weights) sized by `sizes`, matching `tokenizer`'s vocabulary,
    special tokens and length."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        )
    )


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline of these components (no safety checker), DDIM by default."""
    pipe = pipeline_class()(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """`scenes`, `tiny`, `tiny-sd2`: the embedded models; otherwise a diffusers Stable Diffusion folder
    or hub id."""
    if name_or_path in ("tiny", "tiny-sd1", "tiny-sd2"):
        pipe = build_tiny_pipeline("sd2" if name_or_path == "tiny-sd2" else "sd1")
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    if name_or_path == "scenes":
        name_or_path = str(SCENES_MODEL_DIR)
    local = os.path.isdir(name_or_path)
    if not local and name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    pipeline = pipeline_class()
    with quiet_libraries():
        pipe = pipeline.from_pretrained(
            name_or_path,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=local,
            # diffusers asks for it by default and, without accelerate, warns that it cannot
            low_cpu_mem_usage=is_accelerate_available(),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def speaks_scenes_grammar(tokenizer) -> bool:
    """Whether a model's tokenizer knows exactly the scenes captions' words: the shipped scenes model
    and every model `fisedit train` makes, which read only that grammar (`fisedit_ray.prompts`)."""
    words = set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens)
    return words == set(scenes_vocabulary())


def pipeline_class() -> type[StableDiffusionPipeline]:
    """diffusers' `StableDiffusionPipeline`, imported quietly: its module looks up transformers'
    `CLIPImageProcessor`, which, without torchvision, logs that it falls back to its PIL version,
    for an image processor these pipelines never use (no safety checker)."""
    with quiet_libraries():
        from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers and diffusers log errors only, and draw no progress bars (such as "Loading
    pipeline components" and "Writing model shards"), while a model loads or is saved; their settings
    as they were afterwards, so that a program that uses them too keeps its own."""
    libraries = (diffusers_logging, transformers_logging)
    verbosity = [library.get_verbosity() for library in libraries]
    bars = [library.is_progress_bar_enabled() for library in libraries]
    hub_bars_disabled = hub_utils.are_progress_bars_disabled()  # transformers switches them too
    for library in libraries:
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, level, enabled in zip(libraries, verbosity, bars, strict=True):
            library.set_verbosity(level)
            if enabled:
                library.enable_progress_bar()
        if hub_utils.are_progress_bars_disabled() != hub_bars_disabled:
            (hub_utils.disable_progress_bars if hub_bars_disabled else hub_utils.enable_progress_bars)()
