"""The edit engine: cached generation, and edits in three modes (dense, reference, sparse).

A generation runs the diffusers U-Net step by step exactly as `StableDiffusionPipeline` does and
records the activation cache. An edit keeps its parent's seed, scheduler, steps, guidance and size,
and recomputes only the masked region at every step (see docs in DESIGN.md: the masked-dense
reference defines the result; the sparse engine must match it).
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

import diffusers
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from fisedit_ray.cache import ActivationCache, CacheRecorder, parse_dtype
from fisedit_ray.capture import (
    CaptureConfig,
    CrossAttentionMaps,
    attention_queries,
    capture_mask,
    changed_tokens,
    combine_masks,
    dilate,
    latent_difference,
)
from fisedit_ray.macs import AffineMacs, count_macs
from fisedit_ray.masks import MaskLike, MaskPyramid, blob_mask, to_latent_mask
from fisedit_ray.models import DEFAULT_MODEL, load_pipeline, speaks_scenes_grammar
from fisedit_ray.prompts import check_not_empty, scenes_prompt_warnings
from fisedit_ray.reference import LockstepHooks
from fisedit_ray.sparse_unet import GatherPlans, Lane, SparseUNet
from fisedit_ray.step_program import StepProgram

if TYPE_CHECKING:  # imported by `models.pipeline_class`, quietly
    from diffusers import StableDiffusionPipeline

Mode = Literal["sparse", "reference", "dense"]
MODES = ("sparse", "reference", "dense")
# called after each denoising step with (steps done, steps in all): progress bars, the service's
# live progress; it runs on the engine's thread, so it must be quick
Progress = Callable[[int, int], None]
# what `warm_up` generates: any non-empty prompt (the programs it compiles depend on mask sizes only)
_WARM_UP_PROMPT = "a red circle at the center"


@dataclass(frozen=True)
class Settings:
    """What a generation fixes for all its edits."""

    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None
    scheduler: dict

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Version:
    """One image of a session: a generation (no parent) or an edit of its parent."""

    prompt: str
    settings: Settings
    mode: str
    latents: torch.Tensor
    image: Image.Image | None
    cache: ActivationCache
    stats: dict
    parent: Version | None = None
    mask: torch.Tensor | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @functools.cached_property
    def pyramid(self) -> MaskPyramid | None:
        """The mask at every U-Net level (None for a generation)."""
        return None if self.mask is None else MaskPyramid.build(self.mask, self.cache.sizes)

    def lineage(self) -> list[Version]:
        """This version and its ancestors, root first."""
        chain = [self]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        return chain[::-1]


@dataclass
class _Trajectory:
    """One version's denoising state while it runs."""

    embeds: torch.Tensor
    pyramid: MaskPyramid | None
    scheduler: object
    latents: torch.Tensor
    step_kwargs: dict


@dataclass(eq=False)  # identity: jobs hold tensors
class _SparseJob:
    """One edit's state in the lockstep sparse phase."""

    index: int
    parent: Version
    run: _Trajectory
    plans: GatherPlans
    cache: ActivationCache
    lane: Lane | None = None
    keep: bool = True  # record the edit's activations (its delta) for its own children
    record: dict | None = None
    macs: int | None = 0
    output: torch.Tensor | None = None
    text_kv: dict = field(default_factory=dict)  # the lane's cross-attention keys/values, all steps
    scratch: dict = field(default_factory=dict)  # the lane's buffers, refilled at every step
    reads: dict = field(default_factory=dict)  # the parent's reads: placements, steps read ahead

    def cell_counts(self) -> tuple[int, ...]:
        """The rows a pass computes per level (a padded pass's padding included)."""
        return tuple(len(cells) for cells in self.plans.cells)

    def macs_key(self, conv_sites: Iterable[tuple]) -> tuple:
        """What a pass's MACs depend on besides the active cells: shapes, and which convs run dense."""
        return (
            tuple(self.plans.pyramid.sizes),
            tuple(self.lane.sample.shape),
            tuple(self.lane.text.shape),
            self.plans.dense_signature(conv_sites),
        )

    def begin(self, engine: EditEngine, i: int) -> None:
        """Prepare step `i`: the lane the sparse pass runs."""
        t = self.run.scheduler.timesteps[i]
        self.cache.latents.append(self.run.latents)
        self.record = {} if self.keep else None
        reader = self.parent.cache.reader(i, engine.device, engine.dtype, self.reads)
        x = engine._model_input(self.run, t)
        self.lane = Lane(
            x, t, self.run.embeds, reader, self.plans, self.record, self.cache, self.text_kv, self.scratch
        )

    def finish(self, engine: EditEngine, i: int, active: torch.Tensor) -> None:
        """Step `i`'s scheduler step: new noise inside the mask, the parent's outside."""
        t = self.run.scheduler.timesteps[i]
        guided_active = engine._guide(active, self.parent.settings)  # [1, N, C]
        noise = self.parent.cache.noise_preds[i].to(engine.device).clone()
        c = noise.shape[1]
        noise.view(1, c, -1)[:, :, self.plans.pyramid.cells[0]] = guided_active.transpose(1, 2).to(
            noise.dtype
        )
        if self.record is not None:
            self.cache.add_step(self.record)
        self.cache.noise_preds.append(noise)
        stepped = self.run.scheduler.step(noise, t, self.run.latents, **self.run.step_kwargs).prev_sample
        inside = self.run.pyramid.masks[0][None, None]
        self.run.latents = torch.where(inside, stepped, self.parent.cache.latents[i + 1].to(engine.device))
        self.lane = self.record = None


def _one_at_a_time(method):
    @functools.wraps(method)
    def serialized(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return serialized


class EditEngine:
    """Generates images with a recorded activation cache and edits them sparsely.

    Safe to share between threads: requests run one at a time (the cache recorder and the reference
    hook the shared U-Net), so concurrency comes from more engines, not more threads."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        *,
        cache_dtype: torch.dtype | str = torch.float32,
        cache_device: torch.device | str | None = None,
        compile: bool = False,
    ):
        """`cache_dtype`: how caches store their maps; `cache_device`: where they are kept (default:
        the engine's device; `"cpu"` on a GPU engine: host memory, from which an edit copies the rows
        it reads, overlapped with its compute, `kernels.transfer`); `compile`: sparse steps run as
        compiled programs, one per bucket of active-cell counts (`step_program`; the first edit of
        a new bucket pays its compile time, `stats["compile_seconds"]`)."""
        self.pipe = pipe
        self._lock = threading.Lock()
        # `check_prompt` runs outside `_lock` (a service checks a prompt while a batch runs): its
        # own tokenizer, so that it never shares one with a running request
        self._prompt_tokenizer = copy.deepcopy(pipe.tokenizer)
        self._prompt_tokenizer_lock = threading.Lock()
        self._sparse_macs = AffineMacs()  # the MAC counter is a slow dispatch mode: count rarely
        self._dense_macs: dict[tuple, int] = {}
        self.sparse_unet = SparseUNet(pipe.unet, packed=not compile)  # see `SparseUNet`
        self.step_program = StepProgram(self.sparse_unet) if compile else None
        self.cache_dtype = parse_dtype(cache_dtype)
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        # the scenes model reads only its caption grammar: prompts outside it get warnings
        self.is_scenes_model = speaks_scenes_grammar(pipe.tokenizer)
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        cache_dtype: torch.dtype | str | None = None,
        cache_device: str | torch.device | None = None,
        compile: bool = False,
    ) -> EditEngine:
        """`device="auto"`: a GPU where this process sees one (a Ray replica sees only those it was
        given), else the CPU."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(name_or_path, dtype).to(device)
        return cls(pipe, cache_dtype=cache_dtype or dtype, cache_device=cache_device, compile=compile)

    @classmethod
    def from_pipeline(
        cls,
        pipe: StableDiffusionPipeline,
        *,
        cache_dtype: torch.dtype | str | None = None,
        cache_device: str | torch.device | None = None,
        compile: bool = False,
    ) -> EditEngine:
        cache_dtype = cache_dtype or pipe.unet.dtype
        return cls(pipe, cache_dtype=cache_dtype, cache_device=cache_device, compile=compile)

    # ---- properties ---------------------------------------------------------------------------
    # Read off a parameter: diffusers' `ModelMixin.device` walks every module (~2 ms a call).
    @property
    def device(self) -> torch.device:
        return next(self.pipe.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.pipe.unet.parameters()).dtype

    @property
    def vae_scale(self) -> int:
        return self.pipe.vae_scale_factor

    def latent_size(self, settings: Settings) -> tuple[int, int]:
        return settings.height // self.vae_scale, settings.width // self.vae_scale

    # ---- public API ---------------------------------------------------------------------------
    @_one_at_a_time
    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        seed: int = 0,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        output_type: str = "pil",
        record: bool = True,
        progress: Progress | None = None,
    ) -> Version:
        """A new image; `record=False` keeps no activation cache (a plain generation, which can be
        edited only in "dense" mode). `stats["warnings"]`: see `prompt_warnings`."""
        warnings = self.prompt_warnings(prompt)
        _check_output_type(output_type)
        settings = self.settings(seed, num_inference_steps, guidance_scale, height, width, negative_prompt)
        phases = _Phases()
        with phases("text_encode"):
            embeds = self._encode(prompt, settings)
        with phases("dense_steps"):
            cache = self._new_cache(settings)
            macs = self._run_dense([_spec(embeds, None)], settings, cache, record, progress)
        with phases("decode"):
            image = self._decode(cache.latents[-1], output_type)
        stats = _stats("generate", macs, phases, cache, warnings=warnings)
        return Version(prompt, settings, "generate", cache.latents[-1], image, cache, stats)

    @_one_at_a_time
    @torch.no_grad()
    def edit(
        self,
        parent: Version,
        prompt: str,
        *,
        mask: MaskLike | None = None,
        mode: Mode = "sparse",
        capture: CaptureConfig | None = None,
        output_type: str = "pil",
        record: bool = True,
        progress: Progress | None = None,
    ) -> Version:
        """Edit `parent` with a new prompt inside `mask` (see `to_latent_mask` for what it accepts).
        Without a mask, Target Area Capture finds the region the prompt change affects (`capture`
        configures it; with a mask, `capture.combine` may also union or intersect the two). An
        unmasked edit whose prompt reads as the parent's (same tokens) has an empty mask: the
        parent's latents and image (in sparse mode without a U-Net pass). `record=False` keeps no
        activation cache (the same image, sooner, for a version that will not be edited sparsely:
        a plain regeneration in dense mode, a batch job's last edit). `stats["warnings"]`: see
        `prompt_warnings`."""
        warnings = self.prompt_warnings(prompt)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "dense":
            _check_cached(parent)
        _check_output_type(output_type)
        config = capture or CaptureConfig()
        settings = parent.settings
        phases, compiled_before = _Phases(), self._compile_seconds()
        with phases("text_encode"):
            embeds = self._encode(prompt, settings)
        with phases("mask"):
            latent_mask, found = self._edit_mask(parent, prompt, embeds, mask, config, mode)
            pyramid = self._pyramid(latent_mask)
        if mode == "dense":
            with phases("dense_steps"):
                cache = self._new_cache(settings)
                macs = self._run_dense([_spec(embeds, None)], settings, cache, record, progress)
        elif mode == "reference":
            with phases("reference_steps"):
                chain = _dense_lineage(parent)
                specs = [_spec(self._encode(v.prompt, settings), _pyramid_of(v)) for v in chain]
                cache = ActivationCache.delta_of(parent.cache, pyramid.cells, self.cache_device)
                macs = self._run_dense([*specs, _spec(embeds, pyramid)], settings, cache, record, progress)
        else:
            with phases("sparse_steps"):
                ((cache, macs),) = self._run_sparse([(parent, embeds, pyramid)], progress, record)
        with phases("decode"):
            image = self._image(cache, parent, latent_mask, mode, output_type)
        macs["executed"] += found["capture_macs"]
        found["compile_seconds"] = self._compile_seconds() - compiled_before
        stats = _stats(mode, macs, phases, cache, mask_ratio=pyramid.ratio, warnings=warnings, **found)
        return Version(prompt, settings, mode, cache.latents[-1], image, cache, stats, parent, latent_mask)

    def warm_up(
        self,
        mask_ratios: Iterable[float],
        *,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
    ) -> float:
        """Compile the step programs of edits with compact masks of `mask_ratios` at this size and
        guidance (a service replica does before it reports healthy); returns the seconds it took.
        Nothing to do for an engine that does not compile."""
        if self.step_program is None:
            return 0.0
        start = time.perf_counter()
        parent = self.generate(
            _WARM_UP_PROMPT, num_inference_steps=2, guidance_scale=guidance_scale, height=height, width=width,
            output_type="latent",
        )  # fmt: skip
        for ratio in mask_ratios:  # two steps: the first runs eagerly, the second compiles
            mask = blob_mask(tuple(parent.latents.shape[-2:]), ratio, seed=0)
            self.edit(parent, "warm up", mask=mask, output_type="latent")
        return time.perf_counter() - start

    @_one_at_a_time
    @torch.no_grad()
    def find_mask(
        self, parent: Version, prompt: str, *, capture: CaptureConfig | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Target Area Capture alone: the latent mask an unmasked sparse edit of `parent` with
        `prompt` would use, and how it was found (`capture_steps`, `capture_macs`)."""
        _check_cached(parent)
        check_not_empty(prompt)
        embeds = self._encode(prompt, parent.settings)
        return self._edit_mask(parent, prompt, embeds, None, capture or CaptureConfig(), "sparse")

    @_one_at_a_time
    @torch.no_grad()
    def find_mask_uncached(
        self,
        settings: Settings,
        parent_prompt: str,
        parent_mode: str,
        prompt: str,
        *,
        capture: CaptureConfig | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """`find_mask` for a parent known only by its settings, prompt and mode ("generate" or an
        edit's mode): the same mask, bit for bit, for a mask-generation pool that holds no caches.
        The first steps of a dense-computed parent, which `find_mask` reads from its cache, are
        recomputed here (alone, as generated: the same bits), at the price of k more dense steps."""
        check_not_empty(prompt)
        config = capture or CaptureConfig()
        embeds = self._encode(prompt, settings)
        mask, found = self._find(settings, parent_prompt, parent_mode, None, prompt, embeds, config)
        return mask, {**found, "mask_source": "capture"}

    @_one_at_a_time
    @torch.no_grad()
    def edit_batch(
        self,
        requests: list[tuple[Version, str, MaskLike | None]],
        *,
        capture: CaptureConfig | None = None,
        output_type: str = "pil",
        progress: Progress | None = None,
        record: bool = True,
    ) -> list[Version]:
        """Sparse edits `(parent, prompt, mask)` run together: each denoising step is one sparse pass
        over all of them (`SparseUNet.run_lanes`), so the weights are read once per step for the
        whole batch. Each result equals its edit run alone up to float rounding of the batched
        GEMMs. A mask of None is captured as in `edit`, each edit alone. The parents must share
        their number of steps and whether guidance is on. Seconds in the stats are the batch's;
        `batch_size` says how many ran together. `progress` follows the batch's steps; `record` as
        in `edit`."""
        _check_output_type(output_type)
        for parent, _, _ in requests:
            _check_cached(parent)
        warnings = [self.prompt_warnings(prompt) for _, prompt, _ in requests]
        config = capture or CaptureConfig()
        phases, compiled_before = _Phases(), self._compile_seconds()
        with phases("text_encode"):
            embeds = [self._encode(prompt, parent.settings) for parent, prompt, _ in requests]
        with phases("mask"):
            masks = [
                self._edit_mask(parent, prompt, e, mask, config, "sparse")
                for (parent, prompt, mask), e in zip(requests, embeds, strict=True)
            ]
            pyramids = [self._pyramid(latent_mask) for latent_mask, _ in masks]
        with phases("sparse_steps"):
            jobs = [
                (parent, e, pyramid)
                for (parent, _, _), e, pyramid in zip(requests, embeds, pyramids, strict=True)
            ]
            results = self._run_sparse(jobs, progress, record)
        with phases("decode"):
            images = [
                self._image(cache, parent, latent_mask, "sparse", output_type)
                for (cache, _), (parent, _, _), (latent_mask, _) in zip(results, requests, masks, strict=True)
            ]
        versions = []
        for (parent, prompt, _), (cache, macs), image, (latent_mask, found), pyramid, said in zip(
            requests, results, images, masks, pyramids, warnings, strict=True
        ):
            macs["executed"] += found["capture_macs"]
            stats = _stats(
                "sparse",
                macs,
                phases,
                cache,
                mask_ratio=pyramid.ratio,
                batch_size=len(requests),
                compile_seconds=self._compile_seconds() - compiled_before,
                warnings=said,
                **found,
            )
            version = Version(
                prompt, parent.settings, "sparse", cache.latents[-1], image, cache, stats, parent, latent_mask
            )
            versions.append(version)
        return versions

    # ---- pieces -------------------------------------------------------------------------------
    def _pyramid(self, latent_mask: torch.Tensor) -> MaskPyramid:
        return MaskPyramid.build(latent_mask, self.sparse_unet.level_sizes(latent_mask.shape))

    def _edit_mask(
        self, parent: Version, prompt: str, embeds: torch.Tensor, mask, config: CaptureConfig, mode: str
    ) -> tuple[torch.Tensor, dict]:
        """The edit's latent mask and how it was found (stats: its source, the dense steps run to
        capture it and their MACs)."""
        size = self.latent_size(parent.settings)
        user = None if mask is None else to_latent_mask(mask, size, self.vae_scale)
        found = {"mask_source": "user", "capture_steps": 0, "capture_macs": 0}
        if user is not None and config.combine == "replace":
            return user, found
        if user is None and mode == "dense":  # a regeneration: the whole image is the edit
            return torch.ones(size, dtype=torch.bool), {**found, "mask_source": "full"}
        cached = parent.cache.latents[1 : config.dense_steps + 1]
        captured, how = self._find(
            parent.settings, parent.prompt, parent.mode, cached, prompt, embeds, config
        )
        found |= how
        if user is None:
            return captured, {**found, "mask_source": "capture"}
        return combine_masks(user, captured, config.combine), {**found, "mask_source": config.combine}

    def _find(
        self,
        settings: Settings,
        parent_prompt: str,
        parent_mode: str,
        cached: list[torch.Tensor] | None,
        prompt: str,
        embeds: torch.Tensor,
        config: CaptureConfig,
    ) -> tuple[torch.Tensor, dict]:
        """The captured mask of an edit of a parent known by its settings, prompt and mode, and how
        it was found (`capture_steps`, `capture_macs`): empty for the same tokens. `cached`: a
        dense-computed parent's latents after each of the first k steps, from its cache; without
        them they are recomputed, alone, as generated (the same bits), at k more dense steps."""
        if self._same_tokens(prompt, parent_prompt):
            empty = torch.zeros(self.latent_size(settings), dtype=torch.bool)
            return empty, {"capture_steps": 0, "capture_macs": 0}
        k = config.dense_steps
        if k > settings.num_inference_steps:
            raise ValueError(
                f"capture needs {k} dense steps but the parent has {settings.num_inference_steps} steps"
            )
        edited = _sparse_computed(parent_mode)
        recompute = not edited and cached is None
        needs_old = edited or recompute or config.cross_attention > 0
        old_embeds = self._encode(parent_prompt, settings) if needs_old else None
        before = None if edited else cached
        if recompute:
            (before,) = self._probe([_spec(old_embeds, None)], settings, k, None)
        mask, found = self._capture(settings, parent_prompt, old_embeds, before, prompt, embeds, config)
        if recompute:
            found["capture_macs"] *= 2  # the parent's recomputed steps cost as much as the probe's
        return mask, found

    def _capture(
        self,
        settings: Settings,
        parent_prompt: str,
        old_embeds: torch.Tensor | None,
        before: list[torch.Tensor] | None,
        prompt: str,
        embeds: torch.Tensor,
        config: CaptureConfig,
    ) -> tuple[torch.Tensor, dict]:
        """Target Area Capture (see `fisedit_ray.capture`): k dense steps with the new prompt from the
        parent's initial noise, compared with the same steps of the parent's prompt: `before`, a
        dense-computed parent's latents after each of them, else a dense run of its prompt
        alongside (an edited parent's latents differ from its prompt's dense run inside its own
        edits, which this edit must not undo). `old_embeds`: the parent prompt's embeddings, needed
        for that run and for cross-attention."""
        k = config.dense_steps
        runs = [_spec(embeds, None)] if before is not None else [_spec(old_embeds, None), _spec(embeds, None)]
        maps = None
        if config.cross_attention > 0:
            words = {i: w for w, i in self.pipe.tokenizer.get_vocab().items()}
            for special in self.pipe.tokenizer.all_special_ids:
                words.pop(special, None)
            change = changed_tokens(self._token_ids(parent_prompt), self._token_ids(prompt), words)
            sizes = self.sparse_unet.level_sizes(self.latent_size(settings))
            maps = CrossAttentionMaps(self.pipe.unet, sizes, attention_queries(embeds, old_embeds, change))
        try:
            trajectories = self._probe(runs, settings, k, maps)
        finally:
            if maps is not None:
                maps.remove()
        score = latent_difference(trajectories[-1], before if before is not None else trajectories[0])
        if maps is not None:
            w = config.cross_attention
            score = score * ((1 - w) + w * maps.score().to(score.device))
        return capture_mask(score.cpu(), config), {
            "capture_steps": k,
            "capture_macs": self._dense_step_macs(settings, embeds) * k * len(runs),
        }

    def _dense_step_macs(self, settings: Settings, embeds: torch.Tensor) -> int:
        """MACs of one dense U-Net pass (guidance included) at these settings: counted once per shape."""
        size = self.latent_size(settings)
        channels = self.pipe.unet.config.in_channels
        x = torch.zeros(embeds.shape[0], channels, *size, dtype=embeds.dtype, device=self.device)
        shapes = (tuple(x.shape), tuple(embeds.shape))
        if shapes not in self._dense_macs:
            t = torch.tensor(0, device=self.device)
            forward = partial(self.pipe.unet, x, t, encoder_hidden_states=embeds, return_dict=False)
            _, self._dense_macs[shapes] = count_macs(forward)
        return self._dense_macs[shapes]

    def _probe(
        self, specs: list[dict], settings: Settings, k: int, maps: CrossAttentionMaps | None
    ) -> list[list[torch.Tensor]]:
        """The latents after each of the first k dense steps of every run (one batched U-Net pass
        per step; the last run's conditional half is what `maps` reads)."""
        runs = [self._start(spec, settings) for spec in specs]
        embeds = torch.cat([run.embeds for run in runs])
        trajectories: list[list[torch.Tensor]] = [[] for _ in runs]
        for t in runs[0].scheduler.timesteps[:k]:
            if maps is not None:
                maps.begin_step()
            x = torch.cat([self._model_input(run, t) for run in runs])
            (noise,) = self.pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)
            for run, out, trajectory in zip(runs, noise.chunk(len(runs)), trajectories, strict=True):
                guided = self._guide(out, settings)
                run.latents = run.scheduler.step(guided, t, run.latents, **run.step_kwargs).prev_sample
                trajectory.append(run.latents)
        return trajectories

    def _token_ids(self, prompt: str) -> list[int]:
        return self.pipe.tokenizer(prompt).input_ids

    def _same_tokens(self, a: str, b: str) -> bool:
        return self._token_ids(a) == self._token_ids(b)

    def _image(self, cache, parent: Version, latent_mask, mode: str, output_type: str) -> Image.Image | None:
        """The decoded image; outside the mask (grown by the decoder's reach) the parent's pixels."""
        if mode != "dense" and not latent_mask.any() and parent.image is not None and output_type == "pil":
            return parent.image  # nothing changed: no decode
        image = self._decode(cache.latents[-1], output_type)
        if image is not None and mode != "dense" and parent.image is not None:
            image = _composite(image, parent.image, latent_mask, self.vae_scale)
        return image

    def settings(
        self,
        seed: int,
        steps: int,
        guidance: float,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
    ) -> Settings:
        """What `generate` fixes for a version and its edits (None: the model's default size)."""
        default = self.pipe.unet.config.sample_size * self.vae_scale
        height, width = height or default, width or default
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_scale:
                raise ValueError(f"{name} must be a multiple of {self.vae_scale}, got {value}")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        return Settings(
            int(seed),
            int(steps),
            float(guidance),
            int(height),
            int(width),
            negative_prompt,
            dict(self.pipe.scheduler.config),
        )

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What this model will likely misread in `prompt`, one sentence each (with the nearest prompt
        it reads well, where there is one); empty when it is fine. Only the scenes model, which reads
        nothing but its caption grammar (`fisedit_ray.prompts.SCENES_GRAMMAR`), has any. Raises
        ValueError for an empty prompt, as `generate` and `edit` do."""
        check_not_empty(prompt)
        return scenes_prompt_warnings(prompt) if self.is_scenes_model else []

    def check_prompt(self, prompt: str) -> None:
        """Raise ValueError for a prompt the text encoder would silently truncate."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        tokenizer = self._prompt_tokenizer
        with self._prompt_tokenizer_lock:
            # verbose=False: no "indexing errors" warning from transformers; the error below says it
            count = len(tokenizer(prompt, verbose=False).input_ids)
        if count > tokenizer.model_max_length:
            raise ValueError(
                f"prompt is {count} tokens long; this model reads at most {tokenizer.model_max_length}"
            )

    def _encode(self, prompt: str, settings: Settings) -> torch.Tensor:
        self.check_prompt(prompt)
        cfg = settings.guidance_scale > 1.0
        positive, negative = self.pipe.encode_prompt(prompt, self.device, 1, cfg, settings.negative_prompt)
        return torch.cat([negative, positive]) if cfg else positive

    def _start(self, spec: dict, settings: Settings) -> _Trajectory:
        """A fresh scheduler and generator and the initial noise, as the pipeline prepares them."""
        scheduler_class = getattr(diffusers, settings.scheduler.get("_class_name", ""), None)
        scheduler_class = scheduler_class or type(self.pipe.scheduler)
        scheduler = scheduler_class.from_config(settings.scheduler)
        scheduler.set_timesteps(settings.num_inference_steps, device=self.device)
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        h, w = self.latent_size(settings)
        shape = (1, self.pipe.unet.config.in_channels, h, w)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=spec["embeds"].dtype)
        latents = latents * scheduler.init_noise_sigma
        accepted = set(inspect.signature(scheduler.step).parameters)
        step_kwargs = {"generator": generator} if "generator" in accepted else {}
        if "eta" in accepted:
            step_kwargs["eta"] = 0.0
        pyramid = spec["pyramid"].to(self.device) if spec["pyramid"] is not None else None
        return _Trajectory(spec["embeds"], pyramid, scheduler, latents, step_kwargs)

    def _model_input(self, run: _Trajectory, t) -> torch.Tensor:
        x = torch.cat([run.latents] * 2) if run.embeds.shape[0] == 2 else run.latents
        return run.scheduler.scale_model_input(x, t)

    @staticmethod
    def _guide(noise: torch.Tensor, settings: Settings) -> torch.Tensor:
        if noise.shape[0] == 1:
            return noise
        uncond, text = noise.chunk(2)
        return uncond + settings.guidance_scale * (text - uncond)

    def _new_cache(self, settings: Settings) -> ActivationCache:
        sizes = self.sparse_unet.level_sizes(self.latent_size(settings))
        return ActivationCache(self.cache_dtype, sizes, device=self.cache_device)

    def _run_dense(
        self,
        specs: list[dict],
        settings: Settings,
        cache: ActivationCache,
        record: bool = True,
        progress: Progress | None = None,
    ) -> dict:
        """Run versions in lockstep: the first densely, each next one overwritten outside its mask by
        the one before (the masked-dense reference). Records the last one into `cache` (its
        trajectory only, without `record`)."""
        unet = self.pipe.unet
        runs = [self._start(spec, settings) for spec in specs]
        hooks = LockstepHooks(unet, cache.sizes) if len(runs) > 1 else None
        # after the lockstep hooks: the recorder must see mixed values
        recorder = CacheRecorder(unet, cache) if record else None
        cache.planned_steps = len(runs[0].scheduler.timesteps) if record else None
        per_run_macs = []
        try:
            for i, t in enumerate(runs[0].scheduler.timesteps):
                replay = None
                for j, run in enumerate(runs):
                    last = j == len(runs) - 1
                    if hooks is not None:
                        hooks.begin(replay, run.pyramid)
                    if last:
                        cache.latents.append(run.latents)
                        if recorder is not None:
                            recorder.begin_step()
                    x = self._model_input(run, t)
                    forward = partial(unet, x, t, encoder_hidden_states=run.embeds, return_dict=False)
                    shapes = (tuple(x.shape), tuple(run.embeds.shape))
                    if i == 0 and shapes not in self._dense_macs:  # a dense pass's MACs: by shape
                        (noise,), self._dense_macs[shapes] = count_macs(forward)
                    else:
                        (noise,) = forward()
                    if i == 0:
                        per_run_macs.append(self._dense_macs[shapes])
                    if hooks is not None:
                        replay = hooks.recorded
                    noise = self._guide(noise, settings)
                    if last:
                        if recorder is not None:
                            recorder.end_step()
                        cache.noise_preds.append(noise)
                    stepped = run.scheduler.step(noise, t, run.latents, **run.step_kwargs).prev_sample
                    if j > 0:  # outside the mask the scheduler keeps the parent's latents
                        inside = run.pyramid.masks[0][None, None]
                        stepped = torch.where(inside, stepped, runs[j - 1].latents)
                    run.latents = stepped
                if progress is not None:
                    progress(i + 1, len(runs[0].scheduler.timesteps))
            cache.latents.append(runs[-1].latents)
        finally:
            if recorder is not None:
                recorder.remove()
            if hooks is not None:
                hooks.remove()
        steps = len(runs[0].scheduler.timesteps)  # PNDM evaluates the U-Net once more than asked
        return _macs(sum(per_run_macs), per_run_macs[-1], steps)

    def _run_sparse(
        self,
        jobs: list[tuple[Version, torch.Tensor, MaskPyramid]],
        progress: Progress | None = None,
        record: bool = True,
    ) -> list[tuple[ActivationCache, dict]]:
        """Sparse phase of edits `(parent, embeds, pyramid)`, in lockstep: every step runs the
        non-empty ones in one sparse pass (`SparseUNet.run_lanes`). Step 0 runs each alone under the
        MAC counter, so that each edit's stats count its own work. An edit of the whole image
        (Target Area Capture's mask for a new background or style) keeps no cell of its parent: it
        runs as a dense pass, recorded into its delta."""
        results: list = [None] * len(jobs)
        lanes: list[_SparseJob] = []
        for j, (parent, embeds, pyramid) in enumerate(jobs):
            cache = ActivationCache.delta_of(parent.cache, pyramid.cells, self.cache_device)
            steps = parent.cache.num_steps
            if pyramid.empty:  # nothing to recompute: the parent, bit for bit
                cache.latents = list(parent.cache.latents)
                cache.noise_preds = list(parent.cache.noise_preds)
                cache.steps = [{} for _ in range(steps)]
                results[j] = (cache, _macs(0, parent.stats["unet_macs_per_step"], steps))
            elif pyramid.full:  # nothing kept: the same computation as a dense pass, which runs it faster
                dense = self._run_dense([_spec(embeds, None)], parent.settings, cache, record, progress)
                results[j] = (cache, dense)
            else:
                run = self._start(_spec(embeds, pyramid), parent.settings)
                plans = GatherPlans(pyramid, self.device, self.dtype, padded=self.step_program is not None)
                if not record:
                    cache.planned_steps = None
                lanes.append(_SparseJob(j, parent, run, plans, cache, keep=record))
        if len({job.parent.cache.num_steps for job in lanes}) > 1:
            raise ValueError("edits run together must have the same number of denoising steps")
        if len({job.run.embeds.shape[0] for job in lanes}) > 1:
            raise ValueError("edits run together must all use guidance, or all not")
        for i in range(lanes[0].parent.cache.num_steps if lanes else 0):
            for job in lanes:
                job.begin(self, i)
            if i == 0:  # each edit's own MACs: predicted, or counted running it alone
                counted, sites = [], self.sparse_unet.conv_sites
                for job in lanes:
                    job.macs = self._sparse_macs.predict(job.macs_key(sites), job.cell_counts())
                    if job.macs is None:
                        (job.output,), job.macs = count_macs(partial(self._sparse_pass, [job.lane]))
                        self._sparse_macs.add(job.macs_key(sites), job.cell_counts(), job.macs)
                        counted.append(job)
                rest = [job for job in lanes if job not in counted]
                if rest:
                    for job, out in zip(rest, self._sparse_pass([j.lane for j in rest]), strict=True):
                        job.output = out
                outs = [job.output for job in lanes]
            else:
                outs = self._sparse_pass([job.lane for job in lanes])
            for job, out in zip(lanes, outs, strict=True):
                job.finish(self, i, out)
            if progress is not None:
                progress(i + 1, lanes[0].parent.cache.num_steps)
        for job in lanes:
            job.cache.latents.append(job.run.latents)
            dense_per_step = job.parent.stats["unet_macs_per_step"]
            results[job.index] = (job.cache, _macs(job.macs, dense_per_step, job.parent.cache.num_steps))
        return results

    def _sparse_pass(self, lanes: list[Lane]) -> list[torch.Tensor]:
        """One sparse U-Net pass over `lanes`: a step program where the engine compiles, else eager."""
        if self.step_program is not None:
            return self.step_program.run(lanes)
        return self.sparse_unet.run_lanes(lanes)

    def _compile_seconds(self) -> float:
        return 0.0 if self.step_program is None else self.step_program.compile_seconds

    def _decode(self, latents: torch.Tensor, output_type: str) -> Image.Image | None:
        if output_type == "latent":
            return None
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]


def _sparse_computed(mode: str) -> bool:
    """Whether a version of `mode` is an edit inside a mask (not a dense run of its prompt)."""
    if mode not in ("generate", *MODES):
        raise ValueError(f"a version's mode is 'generate' or one of {MODES}, got {mode!r}")
    return mode not in ("generate", "dense")


def _check_cached(parent: Version) -> None:
    if not parent.cache.steps:
        raise ValueError(
            f"version {parent.id} keeps no activation cache (made with record=False): edit it in dense mode"
        )


def _check_output_type(output_type: str) -> None:
    if output_type not in ("pil", "latent"):
        raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")


class _Phases:
    """Wall time per named phase of one request, plus the total."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start

    def report(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}


def _stats(mode: str, macs: dict, phases: _Phases, cache: ActivationCache, **extra) -> dict:
    return {
        "mode": mode,
        **extra,
        "macs_executed": macs["executed"],
        "macs_dense": macs["dense"],
        "unet_macs_per_step": macs["per_step"],
        "seconds": phases.report(),
        "cache_bytes": cache.byte_stats(),
    }


def _macs(executed_per_step: int, dense_per_step: int, steps: int) -> dict:
    return {
        "executed": executed_per_step * steps,
        "dense": dense_per_step * steps,
        "per_step": dense_per_step,
    }


def _spec(embeds: torch.Tensor, pyramid: MaskPyramid | None) -> dict:
    return {"embeds": embeds, "pyramid": pyramid}


def _dense_lineage(version: Version) -> list[Version]:
    """The versions the reference recomputes: back to the nearest one computed densely."""
    chain = version.lineage()
    start = max(i for i, v in enumerate(chain) if v.mode in ("generate", "dense"))
    return chain[start:]


def _pyramid_of(version: Version) -> MaskPyramid | None:
    return None if version.mode in ("generate", "dense") else version.pyramid


def _composite(image: Image.Image, parent: Image.Image, mask: torch.Tensor, scale: int, margin: int = 2):
    """The parent's pixels outside the mask grown by `margin` latent cells: the decoder sees all
    latents, so far from the edit it would otherwise change pixels by rounding noise."""
    keep_new = dilate(mask, margin).cpu().numpy().repeat(scale, 0).repeat(scale, 1)[..., None]
    out = np.where(keep_new, np.asarray(image.convert("RGB")), np.asarray(parent.convert("RGB")))
    return Image.fromarray(out.astype(np.uint8))


__all__ = ["EditEngine", "Progress", "Settings", "Version"]
