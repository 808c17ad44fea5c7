"""Prometheus metrics of the service, through Ray Serve's metrics API: Ray exports them on every
node's metrics port (`ray start --metrics-export-port`), next to Serve's own request, latency and
queue-length metrics, for Prometheus to scrape."""

from __future__ import annotations

from collections.abc import Callable

from ray.serve import metrics

SECONDS = [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100]
RATIOS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
BYTES = [2**k for k in range(16, 36, 2)]


class ServiceMetrics:
    def __init__(self) -> None:
        self.phase_seconds = metrics.Histogram(
            "fisedit_phase_seconds", "Seconds per phase of a request", SECONDS, ("kind", "phase")
        )
        self.mask_ratio = metrics.Histogram("fisedit_mask_ratio", "Share of latent cells edited", RATIOS)
        self.macs_executed = metrics.Counter("fisedit_unet_macs_executed", "U-Net MACs run", ("kind",))
        self.macs_saved = metrics.Counter(
            "fisedit_unet_macs_saved", "U-Net MACs a dense regeneration would add"
        )
        self.cache_bytes = metrics.Histogram("fisedit_cache_bytes", "Bytes of a new version's cache", BYTES)
        self.cache_lookups = metrics.Counter(
            "fisedit_cache_lookups",
            "Parents found hot on the replica (hit), fetched from the object store, or rebuilt",
            ("result",),
        )
        self.sessions = metrics.Gauge("fisedit_sessions", "Sessions in the database")
        self.batch_size = metrics.Histogram(
            "fisedit_batch_size", "Sparse edits run in one batched pass", [1, 2, 3, 4, 6, 8, 12, 16]
        )
        self.in_flight = metrics.Gauge(
            "fisedit_requests_in_flight",
            "Generations and edits this ingress replica waits for (queued or running)",
        )

    def record(self, kind: str, stats: dict) -> None:
        for phase, seconds in stats["seconds"].items():
            self.phase_seconds.observe(seconds, tags={"kind": kind, "phase": phase})
        if stats["macs_executed"] > 0:  # Ray's counters refuse increments of 0
            self.macs_executed.inc(stats["macs_executed"], tags={"kind": kind})
        self.cache_bytes.observe(stats["cache_bytes"]["total"])
        if kind == "edit":
            self.mask_ratio.observe(stats["mask_ratio"])
            if stats["macs_dense"] > stats["macs_executed"]:
                self.macs_saved.inc(stats["macs_dense"] - stats["macs_executed"])
            result = "rebuilt" if stats["rebuilt"] else "fetched" if stats["fetched"] else "hit"
            self.cache_lookups.inc(tags={"result": result})
            if stats["mode"] == "sparse":
                self.batch_size.observe(stats.get("batch_size", 1))


def count_evictions(where: str) -> Callable[[str, int], None]:
    """`BoundedLRU`'s `on_evict` for the versions kept by an editor ("editor") or the cache owner
    ("object_store"): counted by reason, "budget" or "idle"."""
    counter = metrics.Counter("fisedit_cache_evictions", "Versions evicted from a cache", ("where", "reason"))
    return lambda reason, count: counter.inc(count, tags={"where": where, "reason": reason})
