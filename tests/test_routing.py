"""Session placement on editor replicas: sticky, balanced by live sessions, rehomed when a replica dies."""

import pytest

pytest.importorskip("ray")
from fisedit_ray.deployments.routing import SessionPlacement, routing_key  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_new_sessions_balance_and_stay_home():
    placement = SessionPlacement(clock=Clock())
    # every session's hash ring prefers "a": hashing alone would put all of them there
    homes = {f"s{i}": placement.home(f"s{i}", ["a", "b", "c"]) for i in range(9)}
    assert sorted(homes.values()) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    for session, home in homes.items():  # later calls go home, whatever the ring says
        assert placement.home(session, ["c", "b", "a"]) == home
    assert placement.live_sessions() == {"a": 3, "b": 3, "c": 3}


def test_ties_follow_the_ring():
    placement = SessionPlacement(clock=Clock())
    assert placement.home("s0", ["b", "a"]) == "b"
    assert placement.home("s1", ["b", "a"]) == "a"  # "b" holds one already
    assert placement.home("s2", ["a", "b"]) == "a"


def test_idle_sessions_stop_counting():
    clock = Clock()
    placement = SessionPlacement(idle_s=10, clock=clock)
    for i in range(3):
        placement.home(f"old{i}", ["a", "b"])  # a, b, a
    clock.now = 11
    placement.home("old1", ["a", "b"])  # seen again: live, on b
    assert placement.live_sessions() == {"b": 1}
    assert placement.home("new", ["b", "a"]) == "a"


def test_deleted_sessions_stop_counting_but_keep_their_home():
    placement = SessionPlacement(clock=Clock())
    assert [placement.home(s, ["a", "b"]) for s in ("s0", "s1", "s2")] == ["a", "b", "a"]
    placement.retire("s0")
    placement.retire("unknown")
    assert placement.live_sessions() == {"a": 1, "b": 1}
    assert placement.home("s0", ["b", "a"]) == "a"  # a call still in flight goes home


def test_sessions_of_a_dead_replica_move_and_stick():
    placement = SessionPlacement(clock=Clock())
    first = [placement.home(f"s{i}", ["a", "b"]) for i in range(4)]
    assert first == ["a", "b", "a", "b"]
    placement.forget_replicas_except({"b", "c"})
    assert placement.live_sessions() == {"b": 2}
    assert placement.home("s0", ["b", "c"]) == "c"
    assert placement.home("s2", ["b", "c"]) == "c"
    assert placement.home("s1", ["c", "b"]) == "b"
    assert placement.home("s0", ["b", "c"]) == "c"


def test_memory_is_bounded():
    placement = SessionPlacement(max_sessions=2, clock=Clock())
    for session in ("s0", "s1", "s2"):
        placement.home(session, ["a", "b"])
    assert sum(placement.live_sessions().values()) == 2
    with pytest.raises(ValueError, match="no replicas"):
        placement.home("s3", [])


def test_the_replica_that_served_a_session_last_wins_while_it_lives():
    """Another ingress replica moved the session (its `home` in the database says where): go there."""
    placement = SessionPlacement(clock=Clock())
    assert placement.home("s0", ["a", "b"]) == "a"
    assert placement.home("s0", ["a", "b"], last="b") == "b"
    assert placement.home("s0", ["a", "b"]) == "b"  # and it sticks
    assert placement.home("s0", ["a", "c"], last="b") == "a"  # "b" died: placed again by load
    assert placement.home("s1", ["a", "c"], last="gone") == "c"  # a new session: by load


def test_routing_keys_carry_the_last_home():
    assert routing_key("s0", None) == "s0"
    assert routing_key("s0", "r1").partition("@") == ("s0", "@", "r1")
