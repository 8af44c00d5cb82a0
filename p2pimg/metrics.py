"""Prometheus metrics of one p2pimg node. The metric names are a contract: benchmarks and checks
read them (`GET /metrics`, Prometheus text format)."""

from __future__ import annotations

import collections
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "Timeline"]

# `*_created` series double the output and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """A node's metrics in a registry of its own (several nodes may share a process in tests)."""

    def __init__(self) -> None:
        self.timeline = Timeline()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.source_bytes = Counter(
            "p2pimg_source_bytes", "Verified bytes received, by kind of source", ["source"], registry=r
        )
        self.source_requests = Counter(
            "p2pimg_source_requests", "Requests sent to sources, by kind", ["source"], registry=r
        )
        self.verify_failures = Counter(
            "p2pimg_verify_failures",
            "Chunks or blobs not matching their CID or digest, by kind of source",
            ["source"],
            registry=r,
        )
        self.served_bytes = Counter(
            "p2pimg_served_bytes", "Blob and manifest bytes sent to registry clients", registry=r
        )
        self.cache_requests = Counter(
            "p2pimg_cache_requests",
            "Blob requests served from the cache (hit) or fetched (miss)",
            ["result"],
            registry=r,
        )
        self.span_seconds = Histogram(
            "p2pimg_fetch_span_seconds",
            "Time to fetch one span, by kind of source",
            ["source"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.first_byte_seconds = Histogram(
            "p2pimg_fetch_first_byte_seconds",
            "Time to the first byte of a source request",
            ["source"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )
        self.read_ahead_bytes = Counter(
            "p2pimg_read_ahead_bytes",
            "Blob bytes read from the origin before their map was known: taken by a span (used) "
            "or dropped (wasted)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("used", "wasted"):
            self.read_ahead_bytes.labels(outcome)  # shown from the start, as 0
        self.hedges = Counter("p2pimg_fetch_hedges", "Slow spans raced by a second source", registry=r)
        self.peer_requests = Counter(
            "p2pimg_peer_requests", "Peer requests served or refused as busy (429)", ["result"], registry=r
        )
        self.peer_served_bytes = Counter(
            "p2pimg_peer_served_bytes", "Bytes sent to peers from the peer listener", registry=r
        )
        self.cache_evictions = Counter(
            "p2pimg_cache_evictions", "Cache files evicted to keep under --cache-max", registry=r
        )
        self.cache_evicted_bytes = Counter(
            "p2pimg_cache_evicted_bytes", "Bytes of cache files evicted to keep under --cache-max", registry=r
        )
        for result in ("served", "busy", "refused"):
            self.peer_requests.labels(result)
        for kind in ("origin", "peer", "upstream", "gateway"):
            self.source_bytes.labels(kind)
            self.source_requests.labels(kind)
            self.verify_failures.labels(kind)
        for result in ("hit", "miss"):
            self.cache_requests.labels(result)

    def evicted(self, nbytes: int) -> None:
        """A cache file of `nbytes` was evicted (by the size limit, or a gc asked for)."""
        self.cache_evictions.inc()
        self.cache_evicted_bytes.inc(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Timeline:
    """The last `size` timed events of a node (a span from a source, a block from the origin), for
    seeing where a pull's time went: `GET /p2pimg/v1/timeline` on the registry listener, from this
    machine. Times are seconds on one monotonic clock, so events compare with each other only."""

    def __init__(self, size: int = 4096) -> None:
        self.events: collections.deque[dict[str, object]] = collections.deque(maxlen=size)

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def add(self, what: str, start: float, end: float, **fields: object) -> None:
        self.events.append({"what": what, "start": round(start, 4), "end": round(end, 4), **fields})

    def snapshot(self) -> list[dict[str, object]]:
        return list(self.events)
