"""Where each session's edits run: on one editor replica (its hot caches are there), chosen when the
session first shows up as the replica with the fewest live sessions.

Ray Serve's `ConsistentHashRouter` gives affinity, but hashing a handful of sessions over a few
replicas leaves them unbalanced: 8 sessions on 2 replicas split 6:2 or worse one time in four, and
then one replica serves three quarters of the edits while the other idles. `SessionRouter` keeps
that router's retries and back-pressure and changes only the choice of replica: a session's home
while the home lives, else the least loaded replica (ties broken by the hash ring). The placement
lives in the router, that is in each ingress process; the ingress tells it which replica served the
session last (the session's `home` in the database, as `routing_key(session, home)`), so that every
ingress replica sends a session to the same editor, and a session whose home died stays where it
moved. The app runs it without fallback replicas (`num_fallback_replicas=0`): a session's call waits
for its busy home instead of going where the session's caches are not.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

IDLE_S = 300.0  # a session unseen for this long no longer counts as load
MAX_SESSIONS = 100_000  # homes remembered (least recently seen forgotten first)
HOME_SEPARATOR = "@"


def routing_key(session_id: str, home: str | None) -> str:
    """The handle's `session_id` option: the session, and the replica that served it last if known."""
    return f"{session_id}{HOME_SEPARATOR}{home}" if home else session_id


class SessionPlacement:
    """Session -> replica homes: sticky, balanced by live sessions, forgetting dead replicas."""

    def __init__(
        self,
        idle_s: float = IDLE_S,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.idle_s, self.max_sessions, self.clock = idle_s, max_sessions, clock
        self._homes: OrderedDict[str, tuple[Hashable, float]] = OrderedDict()  # by last seen

    def home(self, session_id: str, ring: Sequence[Hashable], last: str | None = None) -> Hashable:
        """The replica for `session_id`; `ring` lists the live replicas, the hash ring's choice first;
        `last` names the replica that served the session last (through any ingress), if known."""
        if not ring:
            raise ValueError("no replicas to place a session on")
        now = self.clock()
        home = self._homes.pop(session_id, (None, 0.0))[0]
        # the replica that served it last, where alive, holds its caches
        home = next((r for r in ring if getattr(r, "unique_id", r) == last), home)
        if home not in ring:
            load = self.live_sessions()
            home = min(ring, key=lambda r: (load.get(r, 0), ring.index(r)))
        self._homes[session_id] = (home, now)
        while len(self._homes) > self.max_sessions:
            self._homes.popitem(last=False)
        return home

    def live_sessions(self) -> dict[Hashable, int]:
        """Sessions seen within `idle_s`, per replica."""
        horizon = self.clock() - self.idle_s
        load: dict[Hashable, int] = {}
        for replica, seen in reversed(self._homes.values()):  # most recent first: stop at the idle ones
            if seen < horizon:
                break
            load[replica] = load.get(replica, 0) + 1
        return load

    def retire(self, session_id: str) -> None:
        """A deleted session: no longer load (its home stays, for calls still in flight)."""
        if session_id in self._homes:
            self._homes[session_id] = (self._homes[session_id][0], float("-inf"))
            self._homes.move_to_end(session_id, last=False)  # oldest first, as `live_sessions` expects

    def forget_replicas_except(self, live: set) -> None:
        for session_id in [s for s, (replica, _) in self._homes.items() if replica not in live]:
            del self._homes[session_id]


class SessionRouter(ConsistentHashRouter):
    """`ConsistentHashRouter` with balanced, sticky session homes (see the module docstring)."""

    def initialize_state(self, idle_s: float = IDLE_S, max_sessions: int = MAX_SESSIONS, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._placement = SessionPlacement(idle_s, max_sessions)

    def _routing_key(self, pending_request) -> str | None:
        """Only sessions get homes; a call without a session id may run on any replica."""
        return (pending_request.metadata.session_id or None) if pending_request is not None else None

    async def choose_replicas(self, candidate_replicas, pending_request=None) -> list:
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        if pending_request is not None and pending_request.metadata.call_method == "drop":
            session_id = pending_request.metadata.session_id.partition(HOME_SEPARATOR)[0]
            self._placement.retire(session_id)  # `Editor.drop`: deleted
        return ranks

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self._placement.forget_replicas_except(set(self._replica_set_snapshot))

    def _lookup_ranked_replicas(self, routing_key: str) -> list:
        session_id, _, last = routing_key.partition(HOME_SEPARATOR)
        ring = super()._lookup_ranked_replicas(session_id)
        if not ring:
            return ring
        ring += sorted(self._replica_set_snapshot - set(ring), key=lambda r: r.unique_id)
        home = self._placement.home(session_id, ring, last or None)
        return [home, *(r for r in ring if r != home)][: 1 + self._num_fallback_replicas]
