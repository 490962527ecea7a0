"""Prometheus metrics of one daemon (its own registry, so tests can run several in a process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes_received = Counter(
            "distd_received_bytes", "Chunk bytes received", ["source"], registry=r
        )
        self.bytes_sent = Counter("distd_sent_bytes", "Chunk bytes sent to other nodes", registry=r)
        self.chunks_verified = Counter(
            "distd_chunks_verified", "Chunks received whose SHA-256 matched", registry=r
        )
        self.chunks_rejected = Counter(
            "distd_chunks_rejected", "Chunks received that failed verification", registry=r
        )
        self.busy_answers = Counter(
            "distd_busy_answers",
            "Chunk requests answered busy (all upload slots taken)",
            registry=r,
        )
        self.peers = Gauge("distd_peers_connected", "Neighbours followed", registry=r)
        self.images = Gauge("distd_images", "Images by state", ["state"], registry=r)
        self.pull_seconds = Histogram(
            "distd_pull_duration_seconds",
            "Time from starting an image to ready",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )

    def received(self, from_seeder: bool, n: int) -> None:
        self.bytes_received.labels(source="seeder" if from_seeder else "peer").inc(n)
        self.chunks_verified.inc()

    def set_gauges(self, peers: int, states: dict[str, int]) -> None:
        self.peers.set(peers)
        for state, count in states.items():
            self.images.labels(state=state).set(count)

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        out: bytes = generate_latest(self.registry)
        return out
