"""Prometheus metrics of the service (``GET /metrics``), one registry per app.

- ``ssd4rec_requests_total{route, status}``: answered requests (``route`` is a known route or ``other``);
- ``ssd4rec_request_latency_seconds{route}``: time from the request's arrival to its answer;
- ``ssd4rec_microbatch_size``: histories per packed tower call;
- ``ssd4rec_queue_depth``: requests waiting for a tower call;
- ``ssd4rec_fallbacks_total`` / ``ssd4rec_truncations_total``: popularity fallbacks, truncated histories;
- ``ssd4rec_deadline_exceeded_total``: requests answered 503 for missing ``--request-timeout-ms``;
- ``ssd4rec_reloads_total{result}``: hot reloads (``ok`` / ``refused``);
- ``ssd4rec_bundle_info{bundle_id, path, tower}`` = 1 for the live bundle (id: sha256 prefix of its manifest).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """The service's metric objects in their own registry (so several apps in one process do not clash)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ssd4rec_requests", "Answered HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("ssd4rec_request_latency_seconds", "Request latency (arrival to answer)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ssd4rec_microbatch_size", "Histories per packed tower call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("ssd4rec_queue_depth", "Requests waiting for a tower call", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.fallbacks = Counter("ssd4rec_fallbacks", "Popularity fallbacks (no known item in the history)",
                                 registry=r)
        self.truncations = Counter("ssd4rec_truncations", "Histories truncated to max_history", registry=r)
        self.deadlines = Counter("ssd4rec_deadline_exceeded", "Requests not served within the request timeout",
                                 registry=r)
        self.reloads = Counter("ssd4rec_reloads", "Hot reloads by result", ["result"], registry=r)
        self.bundle = Gauge("ssd4rec_bundle_info", "The live bundle (1)", ["bundle_id", "path", "tower"], registry=r)

    def set_bundle(self, bundle_id: str, path: str, tower: str) -> None:
        """Make ``bundle_id`` the only live bundle."""
        self.bundle.clear()
        self.bundle.labels(bundle_id=bundle_id, path=path, tower=tower).set(1)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def count_results(self, results: list[dict]) -> None:
        """Count fallbacks and truncations in recommendation results."""
        for res in results:
            if res.get("fallback"):
                self.fallbacks.inc()
            if res.get("truncated"):
                self.truncations.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServiceMetrics"]
