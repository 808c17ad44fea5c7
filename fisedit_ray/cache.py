"""The activation cache: what sparse execution reads of a version, at every denoising step.

Per step and per cache point (named after the U-Net module it feeds):
- `norm_input`: the input of a group norm, as a token-major map `[B, cells, C]`, plus `:stats`, the
  per-group sums and sums of squares of the stored values (float64, `[2, B, G]`); an up-block
  resnet's input `cat([h, skip])` keeps `h` only, as its skip is the input of a down-path layer,
  stored there (`skip_sources`);
- `norm_cell_sums`: for a group norm whose output no conv reads (a transformer's), only per-cell
  group sums `[B, cells, 2G]` (float32), all that its statistics need, plus `:stats` (where that is
  smaller than the input itself: wide maps, few groups);
- `attn_key` / `attn_value`: a self-attention's keys and values `[B, cells, C]`;
- `down_input` / `up_input`: the input of a downsampler or upsampler `[B, cells, C]`.
Every other value sparse execution needs is recomputed from these: a conv halo that reads a group
norm's output is normalised on the fly with the statistics of the version that computed the cell.
Maps are stored in the storage dtype, or as `int8` with one float16 scale per cell (`:scale`),
quantised per cell so that a cell's stored value never depends on other cells.
The trajectory (latents before every step and the guided noise predictions) is kept as computed,
never in the storage dtype, so that an empty edit reproduces its parent bit for bit.
A cache lives on its `device`: where it was computed, or host memory for a GPU engine that keeps its
caches there (`EditEngine(cache_device="cpu")`; pinned, written and read with asynchronous copies,
`kernels.transfer`).

A generation stores full maps. An edit stores a delta: the values at its active cells only, plus
the new statistics, over its parent's cache.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fisedit_ray.kernels.group_norm import (
    cell_sums,
    gather_norm_act,
    group_stats,
    group_sums,
    norm_scale_shift,
    sum_cells,
)
from fisedit_ray.kernels.transfer import gather_to
from fisedit_ray.unet_layout import (
    ATTN_KEY,
    ATTN_VALUE,
    NORM_CELL_SUMS,
    NORM_INPUT,
    cache_points,
    skip_sources,
    tokens,
)

STATS = ":stats"
SCALE = ":scale"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
FORMAT_VERSION = 2
READ_AHEAD_BYTES = 2**20  # per gather (see `CacheReader`): bounds what an edit holds ahead


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"cache storage dtype must be one of {sorted(DTYPES)}, got {dtype}")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dtype_name(dtype)
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"cache storage dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class ActivationCache:
    storage_dtype: torch.dtype
    sizes: list[tuple[int, int]]
    kinds: dict[str, str] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    skips: dict[str, str] = field(default_factory=dict)  # up-block resnet key -> key holding its skip
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    noise_preds: list[torch.Tensor] = field(default_factory=list)
    parent: ActivationCache | None = None
    cells: tuple[torch.Tensor, ...] | None = None
    _rank: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    _owners: dict = field(default_factory=dict, repr=False)  # see `owners`
    _norm_affine: dict = field(default_factory=dict, repr=False)  # see `CacheReader._norm_affine`
    _by_step: dict = field(default_factory=dict, repr=False)  # see `steps_of`
    planned_steps: int | None = field(default=None, repr=False)  # while recording: see `_recorded`
    device: torch.device | None = None  # where the steps are kept; None: where they were computed
    _pending: torch.cuda.Event | None = field(default=None, repr=False)  # see `ready`
    _copying_from: torch.device | None = field(default=None, repr=False)  # see `_copy`

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def delta_of(
        cls, parent: ActivationCache, cells: tuple[torch.Tensor, ...], device: torch.device | None = None
    ) -> ActivationCache:
        """An empty delta over `parent` for an edit of `cells`, kept on `device` (default: the
        parent's)."""
        return cls(
            parent.storage_dtype,
            list(parent.sizes),
            dict(parent.kinds),
            dict(parent.levels),
            dict(parent.skips),
            parent=parent,
            cells=tuple(c.cpu() for c in cells),
            planned_steps=parent.num_steps,
            device=parent.device if device is None else device,
        )

    @property
    def is_delta(self) -> bool:
        return self.parent is not None

    @property
    def depth(self) -> int:
        """How many caches this one is a delta over (0 for a generation's)."""
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    # ---- storage format -----------------------------------------------------------------------
    def cell_sums_are_smaller(self, channels: int, groups: int) -> bool:
        element = torch.empty(0, dtype=self.storage_dtype).element_size()
        return 2 * groups * 4 < channels * element

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`values` `[B, N, C]` as stored: in the storage dtype, or int8 with a float16 scale per cell."""
        values = values.detach()
        if self.storage_dtype != torch.int8:
            return values.to(self.storage_dtype), None
        amax = values.abs().amax(dim=-1, keepdim=True).float()
        scale = (amax / 127).clamp(min=2**-14, max=65504).half()  # normal float16 range
        q = (values.float() / scale.float()).round().clamp(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()

    @staticmethod
    def decode(payload: torch.Tensor, scale: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
        if scale is None:
            return payload if payload.dtype == dtype else payload.to(dtype)
        return (payload.float() * scale.float()).to(dtype)

    def put(
        self, into: dict, key: str, values: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Store the map `values` `[B, N, C]` under `key` in the step dict `into` (only `rows`, if
        given) and return all of it as a reader will see it (float32), for its statistics. An
        up-block resnet's input keeps its `h` part; its skip part is read from the skip's own key."""
        entries, decoded = self.encoded(into, key, values)
        for name, payload in entries.items():
            into[name] = self._recorded(name, payload, rows)
        return decoded

    def encoded(self, into: dict, key: str, values: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """What `put` stores of `values` (`{key: payload}`, and `key:scale` for int8) and the map as
        a reader will see it, without recording anything (a compiled step returns these)."""
        skip = self.skips.get(key)
        tail = None
        if skip is not None:
            c = into[skip].shape[-1]
            values, tail = values[..., :-c], self.decode(*self.encode(values[..., -c:]))
        payload, scale = self.encode(values)
        decoded = self.decode(payload, scale)
        entries = {key: payload} if scale is None else {key: payload, key + SCALE: scale}
        return entries, decoded if tail is None else torch.cat([decoded, tail], dim=-1)

    def rank(self, level: int) -> torch.Tensor:
        if self._rank is None:
            ranks = []
            for size, cells in zip(self.sizes, self.cells, strict=True):
                r = torch.full((size[0] * size[1],), -1, dtype=torch.long)
                r[cells] = torch.arange(len(cells))
                ranks.append(r)
            self._rank = tuple(ranks)
        return self._rank[level]

    def owners(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For every cell of `level`: which cache of the delta chain (0: the root, ..., this one)
        computed it last, and its row there. Read once instead of walking the chain per gather."""
        if level not in self._owners:
            if self.parent is None:
                cells = self.sizes[level][0] * self.sizes[level][1]
                owner, row = torch.zeros(cells, dtype=torch.long), torch.arange(cells)
            else:
                owner, row = self.parent.owners(level)
                rank = self.rank(level)
                owner = torch.where(rank >= 0, self.depth, owner)
                row = torch.where(rank >= 0, rank, row)
            self._owners[level] = (owner, row)
        return self._owners[level]

    def reader(
        self, step: int, device: torch.device | str = "cpu", dtype=torch.float32, memo: dict | None = None
    ) -> CacheReader:
        return CacheReader(self, step, torch.device(device), dtype, memo)

    def _recorded(self, key: str, t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`t` (its `rows`) as stored at the step being recorded: while the number of steps is known
        (`planned_steps`), written into its step's slot of `steps_of(key)`, which then copies
        nothing."""
        step, stacked = len(self.steps), self._by_step.get(key)
        if self.planned_steps is None or step >= self.planned_steps or (stacked is None and step > 0):
            return self._kept((t if rows is None else t.index_select(1, rows)).contiguous())
        if stacked is None:
            shape = t.shape if rows is None else (t.shape[0], len(rows), *t.shape[2:])
            stacked = self._by_step[key] = self._empty(t, (self.planned_steps, *shape))
        if stacked.device != t.device:  # from a GPU into host memory
            return self._copy(stacked[step], t if rows is None else t.index_select(1, rows))
        if rows is None:
            return stacked[step].copy_(t)
        return torch.index_select(t, 1, rows, out=stacked[step])

    def add_step(self, step: dict[str, torch.Tensor]) -> None:
        """Append a recorded step, each tensor moved to the cache's device if it is not there; the
        step's copies from a GPU are marked done by one event after all of them (one stream)."""
        self.steps.append({key: self._kept(t) for key, t in step.items()})
        if self._copying_from is not None:
            self._pending = torch.cuda.Event()
            self._pending.record(torch.cuda.current_stream(self._copying_from))
            self._copying_from = None

    def _empty(self, like: torch.Tensor, shape: tuple) -> torch.Tensor:
        """An uninitialised tensor of `like`'s dtype on the cache's device (pinned host memory for
        a GPU's values, which then copy asynchronously)."""
        device = like.device if self.device is None else self.device
        pin = like.is_cuda and device.type == "cpu"
        return torch.empty(shape, dtype=like.dtype, device=device, pin_memory=pin)

    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the cache's device."""
        if self.device is None or t.device == self.device:
            return t
        return self._copy(self._empty(t, t.shape), t)

    def _copy(self, into: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`into.copy_(t)`: from a GPU, asynchronously (the step's `add_step` marks when its copies
        are done, and `ready` waits for that before a read)."""
        into.copy_(t, non_blocking=True)
        if t.is_cuda and into.device.type == "cpu":
            self._copying_from = t.device
        return into

    def ready(self) -> ActivationCache:
        """The cache once every copy into it has landed (host memory written from a GPU)."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None
        return self

    def steps_of(self, key: str) -> torch.Tensor:
        """Every step's stored `key` as one tensor `[steps, ...]`, so that one read covers several
        steps: recorded so, or built once (a copy), after which each step's entry is a view of it:
        no tensor is kept twice (but for a cache loaded `from_arrays`, whose buffer stays until
        every key is stacked)."""
        stacked = self._by_step.get(key)
        if stacked is None or len(stacked) != self.num_steps:
            stacked = torch.stack([step[key] for step in self.steps])
            for step, view in zip(self.steps, stacked.unbind(0), strict=True):
                step[key] = view
            self._by_step[key] = stacked
        return stacked

    # ---- byte accounting ----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor under the name it is saved with."""
        self.ready()
        out = {f"step{i:04d}/{k}": t for i, step in enumerate(self.steps) for k, t in step.items()}
        out.update({f"latents/{i:04d}": t for i, t in enumerate(self.latents)})
        out.update({f"noise_pred/{i:04d}": t for i, t in enumerate(self.noise_preds)})
        if self.cells is not None:
            out.update({f"cells/{i}": c for i, c in enumerate(self.cells)})
        return out

    def byte_stats(self) -> dict:
        per_kind: dict[str, int] = defaultdict(int)
        per_step = []
        for step in self.steps:
            total = 0
            for key, t in step.items():
                kind = "group_stats" if key.endswith(STATS) else self.kinds[key.removesuffix(SCALE)]
                per_kind[kind] += t.nbytes
                total += t.nbytes
            per_step.append(total)
        trajectory = sum(t.nbytes for t in self.latents) + sum(t.nbytes for t in self.noise_preds)
        cells = sum(c.nbytes for c in self.cells) if self.cells is not None else 0
        per_kind["trajectory"] = trajectory
        if cells:
            per_kind["cells"] = cells
        return {
            "total": sum(per_step) + trajectory + cells,
            "per_step": per_step,
            "per_kind": dict(per_kind),
            "storage_dtype": dtype_name(self.storage_dtype),
            "delta": self.is_delta,
        }

    # ---- persistence --------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "storage_dtype": dtype_name(self.storage_dtype),
            "sizes": [list(s) for s in self.sizes],
            "kinds": self.kinds,
            "levels": self.levels,
            "skips": self.skips,
            "num_steps": self.num_steps,
            "delta": self.is_delta,
        }

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # safetensors writes contiguous tensors only (a batched edit records views of its batch)
        trajectory = {k: v.contiguous() for k, v in self.tensors().items() if not k.startswith("step")}
        save_file(trajectory, folder / "trajectory.safetensors")
        for i, step in enumerate(self.steps):
            save_file({k: v.contiguous() for k, v in step.items()}, folder / f"step{i:04d}.safetensors")
        (folder / "cache.json").write_text(json.dumps(self._meta(), indent=1))

    def to_arrays(self) -> dict:
        """The whole cache (a delta: its own part only) as plain metadata and one numpy byte array
        holding every tensor, which the Ray object store moves without serialising it. One buffer,
        not one per tensor: a scenes-model edit's delta has 1,600 tensors, which as separate buffers
        cost the cache owner 28-35 ms of CPU to receive and store again (one buffer: 14-17 ms).
        Copied with numpy into a buffer sized first: a third of the time of a `torch.cat` of the
        tensors' byte views (9 vs 21 ms for that delta)."""
        # widest elements first: every tensor then starts at a multiple of its element size
        tensors = sorted(self.tensors().items(), key=lambda item: -item[1].element_size())
        data = np.empty(sum(t.nbytes for _, t in tensors), dtype=np.uint8)
        index, start = {}, 0
        for name, t in tensors:
            index[name] = [start, str(t.dtype).removeprefix("torch."), list(t.shape)]
            data[start : start + t.nbytes] = _bytes_of(t)
            start += t.nbytes
        return {"meta": self._meta(), "index": index, "data": data}

    @classmethod
    def from_arrays(cls, payload: dict, parent: ActivationCache | None = None) -> ActivationCache:
        """The cache `to_arrays` gave. Its buffer is copied once (an object store's is read-only);
        the tensors are views of the copy."""
        try:
            meta, index = payload["meta"], payload["index"]
            data = torch.from_numpy(np.array(payload["data"], dtype=np.uint8).reshape(-1))
            tensors = {}
            for name, (start, dtype, shape) in index.items():
                dtype = getattr(torch, dtype)
                if not isinstance(dtype, torch.dtype):
                    raise TypeError(f"{name}: not a dtype")
                nbytes = math.prod(shape) * dtype.itemsize
                if start + nbytes > len(data):
                    raise ValueError(f"{name}: past the end of the data")
                tensors[name] = data[start : start + nbytes].view(dtype).reshape(shape)
            steps: list[dict[str, torch.Tensor]] = [{} for _ in range(meta["num_steps"])]
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise ValueError(f"cannot read the activation cache: {e!r}") from e
        for name, t in tensors.items():
            if name.startswith("step"):
                step, key = name.split("/", 1)
                steps[int(step.removeprefix("step"))][key] = t
        return cls._from_parts(meta, tensors, steps, parent, "the given arrays")

    @classmethod
    def load(cls, folder: str | Path, parent: ActivationCache | None = None) -> ActivationCache:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "cache.json").read_text())
            trajectory = load_file(folder / "trajectory.safetensors")
            steps = [load_file(folder / f"step{i:04d}.safetensors") for i in range(meta["num_steps"])]
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as e:
            raise ValueError(f"cannot load the activation cache in {folder}: {e}") from e
        return cls._from_parts(meta, trajectory, steps, parent, f"in {folder}")

    @classmethod
    def _from_parts(cls, meta, trajectory, steps, parent, where: str) -> ActivationCache:
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"cannot load the activation cache {where}: unsupported format {meta.get('format')!r}"
            )
        if meta["delta"] and parent is None:
            raise ValueError(
                f"cannot load the activation cache {where}: it is a delta and needs its parent's cache"
            )
        try:
            cells = None
            if meta["delta"]:
                cells = tuple(trajectory[f"cells/{i}"] for i in range(len(meta["sizes"])))
            return cls(
                DTYPES[meta["storage_dtype"]],
                [tuple(s) for s in meta["sizes"]],
                meta["kinds"],
                {k: int(v) for k, v in meta["levels"].items()},
                meta["skips"],
                steps,
                [trajectory[f"latents/{i:04d}"] for i in range(meta["num_steps"] + 1)],
                [trajectory[f"noise_pred/{i:04d}"] for i in range(meta["num_steps"])],
                parent=parent,
                cells=cells,
            )
        except KeyError as e:
            raise ValueError(f"cannot load the activation cache {where}: {e} is missing") from e


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat numpy uint8 array (a view where it can be; numpy has no bfloat16)."""
    if t.device.type != "cpu" or t.requires_grad:
        t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


class CacheReader:
    """A version's cached values at one step, in compute dtype and device, through its delta chain.

    The readers of one edit's steps share a `memo` (the caller's: it must not outlive the cells it
    was asked for): which chain member holds which cells (`_placement`), and what a gather read
    ahead for the next steps. The cells an edit reads are the same at every step, and a sparse
    pass reads hundreds of small row sets per step: one read per row set for several steps at once
    costs a fraction of the operations. Without a memo a reader reads its own step only."""

    def __init__(
        self,
        cache: ActivationCache,
        step: int,
        device: torch.device,
        dtype: torch.dtype,
        memo: dict | None = None,
    ):
        self.cache, self.step, self.device, self.dtype = cache.ready(), step, device, dtype
        self.parent = cache.parent.reader(step, device, dtype) if cache.parent is not None else None
        self.chain = [self] if self.parent is None else [*self.parent.chain, self]  # the root's first
        self.reads_ahead = memo is not None
        self.memo = {} if memo is None else memo

    def _stored(self, key: str, rows: torch.Tensor | None, steps: int) -> torch.Tensor:
        """This version's own stored rows of `key` at `steps` steps from this one, decoded (per-cell
        sums stay float32): `[steps, B, rows, C]`."""
        payload, scale = self._window(key, steps)
        payload = gather_to(payload, 2, rows, self.device)
        if self.cache.kinds[key] == NORM_CELL_SUMS:
            return payload
        scale = None if scale is None else gather_to(scale, 2, rows, self.device)
        values = self.cache.decode(payload, scale, self.dtype)
        skip = self.cache.skips.get(key)
        if skip is not None:
            values = torch.cat([values, self._stored(skip, rows, steps)], dim=-1)
        return values

    def _window(self, key: str, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This version's stored `key` and its int8 scales (or None) at `steps` steps from this one,
        as stored: `[steps, B, N, C]` views."""
        window = slice(self.step, self.step + steps)
        scaled = key + SCALE in self.cache.steps[self.step]
        return self.cache.steps_of(key)[window], self.cache.steps_of(key + SCALE)[window] if scaled else None

    def _inherits(self, key: str) -> bool:
        """Whether this step of a delta left `key` entirely to the parent (an empty edit)."""
        return self.parent is not None and key not in self.cache.steps[self.step]

    def gather(self, key: str, cells: torch.Tensor, grouped: bool = False) -> torch.Tensor:
        """Values at `cells` (flat indices of the key's level): `[B, len(cells), C]`; with `grouped`,
        in the order `grouped_order` gives."""
        read = lambda reader, rows, steps: reader._stored(key, rows, steps)  # noqa: E731
        return self._from_owners(("values", key), key, cells, read, grouped)

    def gather_normalized(
        self, key: str, cells: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool, grouped: bool = False
    ):
        """The output of group norm `norm` (+ SiLU) at `cells`, as this version computed it.

        Along a delta chain each cell is normalised with the statistics of the version that last
        recomputed it: outside an edit's mask its norm output is its parent's, not a renormalisation
        of the parent's input under the edit's statistics.
        """
        read = lambda reader, rows, steps: reader._normalize(key, rows, norm, silu, steps)  # noqa: E731
        return self._from_owners(("normalized", key, norm, silu), key, cells, read, grouped)

    def grouped_order(self, key: str, cells: torch.Tensor) -> torch.Tensor | None:
        """Which of `cells` each row of a `grouped` gather holds (positions in `cells`), or None when
        they come in the order of `cells`. The same at every step of an edit: a caller that can
        take the rows in any order (a sum, or an index it remaps once) saves a scatter per read."""
        if self.parent is None:
            return None
        return self._placement(self.cache.levels[key], cells)[1]

    def _from_owners(self, what: tuple, key: str, cells: torch.Tensor, read, grouped: bool) -> torch.Tensor:
        """This step's rows of `read(reader, rows, steps)` of the chain's caches, each for the `cells`
        it computed last, in the order of `cells` (`grouped`: one cache's rows after another's):
        one read per cache that holds some of them, for as many steps ahead as `_steps_ahead`
        allows, kept in the memo until the steps after them are asked for."""
        memo = (what, id(cells), grouped)
        held = self.memo.get(memo)
        if held is None or held[0] is not cells or not 0 <= self.step - held[1] < len(held[2]):
            held = (cells, self.step, self._read_owners(key, cells, read, grouped))
            self.memo[memo] = held  # holding `cells`: its id stays its own
        return held[2][self.step - held[1]]

    def _read_owners(self, key: str, cells: torch.Tensor, read, grouped: bool) -> torch.Tensor:
        steps = self._steps_ahead(key, len(cells))
        if self.parent is None:
            return read(self, self._moved(cells, self.cache.steps[self.step][key].device), steps)
        split = self._placement(self.cache.levels[key], cells)[0]
        if len(split) == 1:
            return read(self.chain[split[0][0]], split[0][1], steps)
        if grouped:
            return torch.cat([read(self.chain[member], rows, steps) for member, rows, _ in split], dim=2)
        out = None
        for member, rows, at in split:
            values = read(self.chain[member], rows, steps)
            if out is None:
                out = values.new_empty(*values.shape[:2], len(cells), values.shape[3])
            out[:, :, at] = values
        return out

    def _steps_ahead(self, key: str, rows: int) -> int:
        """How many steps from this one a gather of `rows` rows of `key` reads at once: as many as
        fit in `READ_AHEAD_BYTES` (at least this one; only this one without a shared memo)."""
        if not self.reads_ahead:
            return 1
        stored = self.chain[0].cache.steps[self.step][key]  # the root keeps every key
        per_step = max(1, rows * stored.shape[0] * stored.shape[-1] * self.dtype.itemsize)
        return max(1, min(self.cache.num_steps - self.step, READ_AHEAD_BYTES // per_step))

    def _moved(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`index` on `device`, moved once per edit (kept in the memo): a GPU engine reading a cache in
        host memory would otherwise copy the same index at every step, each copy waiting for the
        GPU to catch up."""
        if index.device == device:
            return index
        memo = ("moved", id(index), device)
        held = self.memo.get(memo)
        if held is None or held[0] is not index:
            held = self.memo[memo] = (index, index.to(device))  # holding `index`: its id stays its own
        return held[1]

    def _placement(
        self, level: int, cells: torch.Tensor
    ) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """`(chain member, its rows, positions in cells)` for each member that computed some of
        `cells` last, and the positions in member order (`grouped_order`; None for one member).
        The same at every step of an edit (its gather plans are): kept in the memo."""
        memo = ("placement", level, id(cells))
        held = self.memo.get(memo)
        if held is not None and held[0] is cells:
            return held[1]
        owner, row = self.cache.owners(level)
        who, rows = owner[cells.cpu()], row[cells.cpu()]
        present = [m for m, n in enumerate(torch.bincount(who, minlength=len(self.chain)).tolist()) if n]
        split = []
        for member in present:
            at = (who == member).nonzero().squeeze(1)
            split.append((member, rows[at], at.to(self.device)))
        order = None if len(split) == 1 else torch.cat([at for _, _, at in split])
        self.memo[memo] = (cells, (split, order))  # holding `cells`: its id stays its own
        return split, order

    def _normalize(self, key: str, rows: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool, steps: int):
        """`norm` (+ SiLU) of this version's own rows of `key`, under its statistics, at `steps` steps
        from this one: `[steps, B, rows, C]`; the steps are folded into the batch dimension."""
        affine = [self._norm_affine(self.step + s, key, norm) for s in range(steps)]
        # [steps * B, C], as the steps fold into the batch dimension
        scale, shift = (torch.cat(a) if steps > 1 else a[0] for a in zip(*affine, strict=True))
        payload, x_scale = self._window(key, steps)
        if payload.device == self.device and key not in self.cache.skips:
            # gather, decode, normalise and activate in one pass (one kernel on a GPU)
            x_scale = None if x_scale is None else x_scale.flatten(0, 1)
            rows = rows.to(self.device)
            y = gather_norm_act(payload.flatten(0, 1), rows, scale, shift, silu, x_scale, self.dtype)
        else:
            y = gather_norm_act(self._stored(key, rows, steps).flatten(0, 1), None, scale, shift, silu)
        return y.unflatten(0, (steps, -1))

    def _norm_affine(self, step: int, key: str, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, ...]:
        """`norm`'s per-channel scale and shift `[B, C]` under this version's statistics at `step`.
        Kept with the cache: every later edit over this version reads them again at every step (a
        cache is read with the weights that recorded it)."""
        memo = (step, key, self.dtype, self.device)
        affine = self.cache._norm_affine.get(memo)
        if affine is None:
            h, w = self.cache.sizes[self.cache.levels[key]]
            channels = norm.num_channels
            stats = self.cache.steps[step][key + STATS].to(self.device, non_blocking=True)
            mean, rstd = group_stats(stats, h * w * channels // norm.num_groups, norm.eps)
            affine = norm_scale_shift(mean, rstd, norm.weight, norm.bias, channels, self.dtype)
            self.cache._norm_affine[memo] = affine
        return affine

    def full(self, key: str, scratch: dict | None = None, heads: int | None = None) -> torch.Tensor:
        """The whole map `[B, cells, C]`, in a tensor the caller may modify: a fresh one, or the
        caller's buffer for `key` in `scratch`, refilled (a big map in fresh memory costs a page
        fault per 4 KiB at every step; a buffer kept for all the steps of an edit does not).

        With `heads`, `[B, cells, heads, C // heads]` over head-major memory: each head's rows
        contiguous, as a CPU's fused attention reads keys and values fastest (about a third faster
        over 4096 keys than through the token-major map's strides)."""
        if self.parent is None:
            stored = self._stored(key, None, 1)[0]
            stored = stored if heads is None else stored.unflatten(-1, (heads, -1))
            buffer = None if scratch is None else scratch.get(key)
            if buffer is None or buffer.shape != stored.shape or buffer.dtype != stored.dtype:
                buffer = _empty_map(stored, heads)
                if scratch is not None:
                    scratch[key] = buffer
            return buffer.copy_(stored)
        if self._inherits(key):
            return self.parent.full(key, scratch, heads)
        values = self.parent.full(key, scratch, heads)  # the caller's: this version's rows go in in place
        cells = self._moved(self.cache.cells[self.cache.levels[key]], self.device)
        rows = self._stored(key, None, 1)[0].to(values.dtype)
        values[:, cells] = rows.reshape(*rows.shape[:2], *values.shape[2:])  # [B, N, C] or by heads
        return values

    def stats(self, key: str) -> torch.Tensor:
        if self._inherits(key):
            return self.parent.stats(key)
        return self.cache.steps[self.step][key + STATS].to(self.device, non_blocking=True)


class CacheRecorder:
    """Forward hooks that record a dense U-Net pass into the cache (read only: outputs unchanged).

    Into a delta cache it records the values at the delta's active cells and whole-map statistics."""

    def __init__(self, unet: torch.nn.Module, cache: ActivationCache):
        self.cache = cache
        cache.skips = cache.skips or skip_sources(unet)
        self.current: dict[str, torch.Tensor] | None = None
        self.handles = []
        for key, kind, module, groups in cache_points(unet):
            if kind in (ATTN_KEY, ATTN_VALUE):
                hook = self._output_hook(key, kind)
                self.handles.append(module.register_forward_hook(hook))
            else:
                hook = self._input_hook(key, kind, groups)
                self.handles.append(module.register_forward_pre_hook(hook))

    def _put(self, key: str, kind: str, tokens: torch.Tensor, groups: int | None) -> None:
        if self.current is None:
            return
        level = self.cache.sizes.index(self._size_of(tokens))
        if kind == NORM_CELL_SUMS and not self.cache.cell_sums_are_smaller(tokens.shape[-1], groups):
            kind = NORM_INPUT
        self.cache.kinds[key] = kind
        self.cache.levels[key] = level
        rows = None
        if self.cache.cells is not None:  # a delta keeps the active cells only
            rows = self.cache.cells[level].to(tokens.device)
        if kind == NORM_CELL_SUMS:
            sums = cell_sums(tokens, groups)
            self.current[key + STATS] = sum_cells(sums)
            self.current[key] = sums if rows is None else sums.index_select(1, rows)
            return
        stored = self.cache.put(self.current, key, tokens, rows)
        if groups is not None:
            self.current[key + STATS] = group_sums(stored, groups)

    def _size_of(self, tokens: torch.Tensor) -> tuple[int, int]:
        for size in self.cache.sizes:
            if size[0] * size[1] == tokens.shape[1]:
                return size
        raise RuntimeError(f"no U-Net level has {tokens.shape[1]} cells")

    def _input_hook(self, key, kind, groups):
        def hook(module, args):
            self._put(key, kind, tokens(args[0]), groups)

        return hook

    def _output_hook(self, key, kind):
        def hook(module, args, output):
            self._put(key, kind, output, None)

        return hook

    def begin_step(self) -> None:
        self.current = {}

    def end_step(self) -> None:
        self.cache.add_step(self.current)
        self.current = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _empty_map(like: torch.Tensor, heads: int | None) -> torch.Tensor:
    """An uninitialised map shaped as `like`: `[B, cells, C]` contiguous, or with `heads`
    (`like` `[B, cells, heads, D]`) over `[B, heads, cells, D]` memory."""
    if heads is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    b, cells, _, d = like.shape
    return like.new_empty(b, heads, cells, d).transpose(1, 2)
