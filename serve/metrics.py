"""Prometheus metrics, one registry per app (several apps may live in one process, as in tests).

Under `lotus serve --workers N` the CLI sets PROMETHEUS_MULTIPROC_DIR, and /metrics adds up the
values of every worker process (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest, multiprocess

from lotus.drop import MAX_DROP

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DROP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, MAX_DROP)

disable_created_metrics()  # no *_created series: they double the output and dashboards ignore them


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lotus_requests", "HTTP requests by route template, method and status.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "lotus_request_duration_seconds",
            "HTTP request latency, from the first byte in to the last out.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lotus_batch_size_images", "Images in each ONNX Runtime call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "lotus_inference_duration_seconds", "Time of each ONNX Runtime call.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.drop = Histogram(
            "lotus_drop_ratio", "Drop ratio each inference request asked for.", buckets=DROP_BUCKETS, registry=r
        )
        self.images = Counter("lotus_images", "Images classified.", ["route"], registry=r)
        self.queue = Gauge(
            "lotus_queue_images",
            "Images admitted and not yet answered (bounded by --max-queue-images).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.dropped = Counter(
            "lotus_dropped_requests",
            "Requests not run: queue_full (503), deadline (504), client_gone (the client disconnected first).",
            ["reason"],
            registry=r,
        )

    def observe_batch(self, images: int, drop: float, seconds: float) -> None:
        self.batch_size.observe(images)
        self.inference.observe(seconds)

    def exposition(self) -> bytes:
        """The text format of every metric (of all worker processes in multiprocess mode)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
