"""Prometheus metrics of one server instance (its own registry, so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Requests, decisions by kind, images scanned, scan/upstream latency, rejections by reason."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guardalign_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.decisions = Counter("guardalign_decisions", "Guard decisions, by kind (allow, mask, block, flag).", ["decision"], registry=r)
        self.images = Counter("guardalign_images_scanned", "Images scanned by the detector (reused verdicts included).", registry=r)
        self.rejections = Counter("guardalign_rejections", "Requests refused before reaching a model, by reason.", ["reason"], registry=r)
        self.scan_seconds = Histogram("guardalign_scan_seconds", "Time to screen one request's images.", buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_seconds = Histogram(
            "guardalign_upstream_seconds", "Time until the upstream answered (headers), per request.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_images = Histogram(
            "guardalign_scan_batch_images", "Images per detector batch (micro-batching).", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.in_flight = Gauge("guardalign_in_flight", "Requests holding a processing slot.", registry=r)
        self.queued = Gauge("guardalign_queued", "Requests waiting for a processing slot.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
