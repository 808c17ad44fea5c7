"""A byte budget and an idle expiry for what a replica keeps per session (an editor's hot versions,
the cache owner's object-store entries): least recently used first beyond the budget, and every
entry of a session unused for longer than the expiry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
Key = tuple[str, str]  # (session id, version id)


class BoundedLRU(Generic[V]):
    def __init__(
        self,
        max_bytes: float,
        idle_s: float = float("inf"),
        on_evict: Callable[[str, int], None] = lambda reason, count: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`on_evict(reason, count)`: told of evictions, `reason` "budget" or "idle" (metrics)."""
        self.max_bytes, self.idle_s, self.on_evict, self.clock = max_bytes, idle_s, on_evict, clock
        self._entries: OrderedDict[Key, tuple[V, int]] = OrderedDict()  # least recently used first
        self._used: OrderedDict[str, float] = OrderedDict()  # session -> last use, oldest first
        self.bytes = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> V | None:
        self.expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self._touch(key[0])
        return entry[0]

    def put(self, key: Key, value: V, nbytes: int) -> None:
        """Keep `value`; the newest entry stays even when it alone exceeds the budget."""
        self._remove(key)
        self._entries[key] = (value, nbytes)
        self.bytes += nbytes
        self._touch(key[0])
        evicted = 0
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            self._remove(next(iter(self._entries)))
            evicted += 1
        if evicted:
            self.on_evict("budget", evicted)
        self.expire()

    def drop_session(self, session_id: str) -> int:
        keys = [k for k in self._entries if k[0] == session_id]
        for key in keys:
            self._remove(key)
        self._used.pop(session_id, None)
        return len(keys)

    def expire(self) -> None:
        """Drop the entries of sessions unused for longer than `idle_s`."""
        horizon = self.clock() - self.idle_s
        while self._used and next(iter(self._used.values())) < horizon:
            session_id = next(iter(self._used))
            evicted = self.drop_session(session_id)
            if evicted:
                self.on_evict("idle", evicted)

    def _touch(self, session_id: str) -> None:
        self._used[session_id] = self.clock()
        self._used.move_to_end(session_id)

    def _remove(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]
