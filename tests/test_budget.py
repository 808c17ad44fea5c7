"""The byte budget and idle expiry of what editors and the cache owner keep per session."""

from fisedit_ray.deployments.budget import BoundedLRU


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lru(max_bytes=100, idle_s=float("inf")):
    evictions = []
    cache = BoundedLRU(max_bytes, idle_s, lambda reason, n: evictions.append((reason, n)), clock := Clock())
    return cache, evictions, clock


def test_least_recently_used_go_first_beyond_the_budget():
    cache, evictions, _ = lru(max_bytes=100)
    cache.put(("s1", "v0"), "a", 40)
    cache.put(("s1", "v1"), "b", 40)
    assert cache.get(("s1", "v0")) == "a"  # used: v1 is now the least recent
    cache.put(("s2", "v0"), "c", 40)
    assert ("s1", "v1") not in cache and cache.get(("s1", "v0")) == "a" and cache.bytes == 80
    assert evictions == [("budget", 1)]


def test_the_newest_entry_stays_even_over_the_budget():
    cache, evictions, _ = lru(max_bytes=100)
    cache.put(("s1", "v0"), "a", 40)
    cache.put(("s1", "v1"), "big", 500)
    assert len(cache) == 1 and cache.get(("s1", "v1")) == "big" and evictions == [("budget", 1)]


def test_replacing_an_entry_counts_its_bytes_once():
    cache, _, _ = lru()
    cache.put(("s1", "v0"), "a", 40)
    cache.put(("s1", "v0"), "a2", 30)
    assert cache.bytes == 30 and cache.get(("s1", "v0")) == "a2"


def test_idle_sessions_expire_whole():
    cache, evictions, clock = lru(max_bytes=1000, idle_s=60)
    cache.put(("s1", "v0"), "a", 10)
    cache.put(("s1", "v1"), "b", 10)
    clock.now = 30
    cache.put(("s2", "v0"), "c", 10)
    clock.now = 70  # s1 unused for 70 s, s2 for 40 s
    assert cache.get(("s2", "v0")) == "c"
    assert ("s1", "v0") not in cache and ("s1", "v1") not in cache and cache.bytes == 10
    assert evictions == [("idle", 2)]
    clock.now = 200
    cache.expire()  # as a health check does, with no call coming
    assert len(cache) == 0 and cache.bytes == 0 and evictions == [("idle", 2), ("idle", 1)]


def test_a_session_in_use_does_not_expire():
    cache, evictions, clock = lru(idle_s=60)
    cache.put(("s1", "v0"), "a", 10)
    for t in range(30, 300, 30):
        clock.now = t
        assert cache.get(("s1", "v0")) == "a"
    assert evictions == []


def test_dropping_a_session_frees_its_bytes():
    cache, evictions, _ = lru()
    cache.put(("s1", "v0"), "a", 10)
    cache.put(("s2", "v0"), "b", 20)
    assert cache.drop_session("s1") == 1 and cache.drop_session("s1") == 0
    assert cache.bytes == 20 and evictions == []  # a deletion is not an eviction
