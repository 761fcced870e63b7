"""Prometheus metrics of one registry service (its own CollectorRegistry, so several services
in one process, as in tests, do not collide)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["RegistryMetrics"]

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class _QueueCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, tuple[int, float | None]]]) -> None:
        self._stats = stats

    def collect(self):  # type: ignore[no-untyped-def]
        length = GaugeMetricFamily(
            "cvmfs_registry_queue_length", "jobs waiting to be published", labels=["repository"]
        )
        age = GaugeMetricFamily(
            "cvmfs_registry_queue_oldest_age_seconds",
            "age of the oldest waiting job",
            labels=["repository"],
        )
        now = time.time()
        for repo, (count, oldest) in sorted(self._stats().items()):
            length.add_metric([repo], count)
            age.add_metric([repo], max(0.0, now - oldest) if oldest else 0.0)
        yield length
        yield age


class RegistryMetrics:
    def __init__(self, queue_stats: Callable[[], dict[str, tuple[int, float | None]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.publishes = Counter(
            "cvmfs_registry_publishes", "revisions published", ["repository"], registry=r
        )
        self.cids_published = Counter(
            "cvmfs_registry_cids_published", "content IDs made visible", ["repository"], registry=r
        )
        self.bytes_ingested = Counter(
            "cvmfs_registry_bytes_ingested", "bytes of accepted uploads", registry=r
        )
        self.errors = Counter("cvmfs_registry_errors", "errors by kind", ["kind"], registry=r)
        self.connections = Gauge(
            "cvmfs_registry_connections", "HTTP connections open", registry=r
        )
        self.uploads_receiving = Gauge(
            "cvmfs_registry_uploads_receiving",
            "upload bodies being received (OCI, resumable, user-pub)",
            registry=r,
        )
        self.publish_duration = Histogram(
            "cvmfs_registry_publish_duration_seconds",
            "time to commit one revision",
            ["repository"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_visible = Histogram(
            "cvmfs_registry_time_to_visible_seconds",
            "from accepted upload to published revision",
            ["repository"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_stratum1 = Histogram(
            "cvmfs_registry_time_to_stratum1_seconds",
            "from accepted upload to the revision in the local Stratum 1",
            ["repository"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.registry.register(_QueueCollector(queue_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
