"""A sparse step as a fixed program: the same tensor operations at every denoising step of an edit,
compiled once per bucket of shapes and replayed.

An eager sparse pass (`SparseUNet.run_lanes`) mixes three things at every step: reading the parent's
cache (memo look-ups, read-ahead, chain walks), computing, and recording the new delta. Only the
middle part is the same program at every step. `StepProgram` splits them:

1. reads: the first step of a pass runs eagerly and logs every call it makes to each lane's
   `CacheReader`; every later step replays that log on its own step's reader, outside the program;
2. compute: `_Run.forward` over stand-in readers that hand out those reads in order and a store that
   encodes what to record without recording it: a function of tensors alone, with no host read and
   no decision on values (`torch.compile`d, `fullgraph`: a graph break is an error);
3. records and outputs: written into the lane's delta cache after the program, padding dropped.

With plans padded to buckets (`GatherPlans(padded=True)`), a program's shapes depend on the buckets
of the active and halo cell counts alone, so one compiled program serves every mask of the same
buckets, model, dtype and device (torch.compile's own cache, keyed by its guards).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch._dynamo

from fisedit_ray.cache import SCALE, STATS, ActivationCache, CacheReader
from fisedit_ray.sparse_unet import Lane, SparseUNet, _Run
from fisedit_ray.unet_layout import NORM_CELL_SUMS

# one compiled program per bucket: far more than dynamo's default of 8 for one function
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)

_READS = "step_program.reads"  # a pass's read logs, kept with its indices (`SparseUNet.pass_indices`)


def _forward(sparse: SparseUNet, lanes: list[Lane]) -> list[torch.Tensor]:
    return _Run(sparse, lanes).forward()


class StepProgram:
    """Runs sparse passes of padded plans as fixed programs (compiled unless `compiled=False`,
    which runs the same split eagerly). `compile_seconds` and `programs` count what compiling cost.
    A compiled program needs `sparse`'s weights plain (`SparseUNet(packed=False)`)."""

    def __init__(self, sparse: SparseUNet, compiled: bool = True):
        if compiled and sparse.packed:
            raise ValueError("a compiled step program needs plain weights: SparseUNet(unet, packed=False)")
        self.sparse = sparse
        # on a GPU, CUDA graphs too (one per program, replayed at every step): untested on a GPU
        cuda = next(sparse.unet.parameters()).is_cuda
        mode = "reduce-overhead" if cuda else None
        self._program = (
            torch.compile(_forward, dynamic=False, fullgraph=True, mode=mode) if compiled else _forward
        )
        self.compile_seconds = 0.0
        self.programs = 0

    @torch.no_grad()
    def run(self, lanes: list[Lane]) -> list[torch.Tensor]:
        """Each lane's U-Net output at its active cells, as `SparseUNet.run_lanes` returns it."""
        held = self.sparse.pass_indices(lanes)
        logs = held.get(_READS)
        first = logs is None
        if first:  # the pass's first step: eager, logging its reads
            logs = [[] for _ in lanes]
            readers = [_LoggingReader(lane.parent, log) for lane, log in zip(lanes, logs, strict=True)]
        else:
            readers = [_replay(lane.parent, log) for lane, log in zip(lanes, logs, strict=True)]
        stand_ins = [
            replace(
                lane, parent=reader, record=None if lane.record is None else {}, store=_Encoder(lane.store)
            )
            for lane, reader in zip(lanes, readers, strict=True)
        ]
        if first:
            outs = _forward(self.sparse, stand_ins)
            held[_READS] = logs
        else:
            outs = self._timed(stand_ins)
        return [self._finish(*args) for args in zip(lanes, stand_ins, outs, strict=True)]

    def _timed(self, lanes: list[Lane]) -> list[torch.Tensor]:
        """The program, counting the time of a call that compiled a new one."""
        counters = torch._dynamo.utils.counters["stats"]
        before, start = counters["unique_graphs"], time.perf_counter()
        outs = self._program(self.sparse, lanes)
        if counters["unique_graphs"] != before:
            self.compile_seconds += time.perf_counter() - start
            self.programs += counters["unique_graphs"] - before
        return outs

    @staticmethod
    def _finish(lane: Lane, stand_in: Lane, out: torch.Tensor) -> torch.Tensor:
        """Record what the program computed for `lane`, without its padding; its output likewise."""
        cells, cache = lane.plans.pyramid.cells, lane.store
        for name, t in (stand_in.record or {}).items():
            if name.endswith(STATS):  # whole-map sums, set as they are
                lane.record[name] = t
                continue
            # maps `[B, rows, ...]` and their int8 scales: the real cells' rows
            t = t[:, : len(cells[cache.levels[name.removesuffix(SCALE)]])]
            # per-cell sums are set as they are; maps and their int8 scales recorded as `put` does
            cell_sums = cache.kinds.get(name) == NORM_CELL_SUMS
            lane.record[name] = t.contiguous() if cell_sums else cache._recorded(name, t, None)
        return out[:, : len(cells[0])]


class _LoggingReader:
    """A `CacheReader` that logs each call (the first step of a pass)."""

    def __init__(self, reader: CacheReader, log: list):
        self.reader, self.cache, self.log = reader, reader.cache, log

    def __getattr__(self, name: str):
        method = getattr(self.reader, name)

        def logged(*args, **kwargs):
            self.log.append((name, args, kwargs))
            return method(*args, **kwargs)

        return logged


def _replay(reader: CacheReader, log: list) -> _Tape:
    return _Tape(reader.cache, [getattr(reader, name)(*args, **kwargs) for name, args, kwargs in log])


class _Tape:
    """Stands in for a `CacheReader` inside a program: hands out the reads made before it, in order."""

    def __init__(self, cache: ActivationCache, reads: list):
        self.cache, self.reads, self.next = cache, reads, 0

    def _read(self, *args, **kwargs):
        self.next += 1
        return self.reads[self.next - 1]

    stats = gather = gather_normalized = grouped_order = full = _read


class _Encoder:
    """Stands in for a lane's cache inside a program: puts what `put` would record, encoded, into
    the program's own record dict (`StepProgram._finish` records it)."""

    def __init__(self, cache: ActivationCache | None):
        self.cache = cache
        self.storage_dtype = None if cache is None else cache.storage_dtype

    def put(self, into: dict, key: str, values: torch.Tensor) -> torch.Tensor:
        entries, decoded = self.cache.encoded(into, key, values)
        into.update(entries)
        return decoded
