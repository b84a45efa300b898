"""`/metrics`: the site in the Prometheus text format, from the standard client library.

Counters and histograms of history events (grants, fence refusals, flush sizes and durations)
count each event once as the watcher brings it; gauges (leases by state, unflushed bytes per
host, orphaned projects) and the broker's grant and renew latency histograms are read from the
watcher's latest snapshot at each scrape. An etcd site has no broker to time its requests:
etcd's own /metrics has those (etcd_server_* and grpc_server_handling_seconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from dbguard.web.watch import SiteWatcher

_MIB = 1 << 20
_FLUSH_BYTES = tuple(float(_MIB * 4**n) for n in range(8))  # 1 MiB to 16 GiB
_FLUSH_SECONDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
STATES = ("held", "orphaned", "lock-delay", "free")


class SiteMetrics:
    """The registry `/metrics` shows; `count` takes new history events from the watcher."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "dbguard_events", "History events seen, by kind (dbguard log)", ["event"], registry=self.registry
        )
        self.grants = Counter("dbguard_grants", "Writer leases granted", registry=self.registry)
        self.fence_refusals = Counter(
            "dbguard_fence_refusals",
            "Flushes refused because a newer writer's token fenced them",
            registry=self.registry,
        )
        self.flush_bytes = Histogram(
            "dbguard_flush_bytes",
            "Bytes written to the project store per flush",
            buckets=_FLUSH_BYTES,
            registry=self.registry,
        )
        self.flush_seconds = Histogram(
            "dbguard_flush_seconds", "Seconds per flush", buckets=_FLUSH_SECONDS, registry=self.registry
        )
        self._watcher: SiteWatcher | None = None

    def watch(self, watcher: SiteWatcher) -> None:
        self._watcher = watcher
        self.registry.register(_SnapshotCollector(watcher))

    def count(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = str(event.get("event"))
            self.events.labels(event=kind).inc()
            if kind == "granted":
                self.grants.inc()
            elif kind == "fence-refused":
                self.fence_refusals.inc()
            elif kind == "flushed":
                size, seconds = event.get("bytes"), event.get("seconds")
                if isinstance(size, int | float) and isinstance(seconds, int | float):  # untrusted
                    self.flush_bytes.observe(float(size))
                    self.flush_seconds.observe(float(seconds))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector(Collector):
    def __init__(self, watcher: SiteWatcher) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        view = self.watcher.snapshot()
        up = GaugeMetricFamily(
            "dbguard_lease_service_up", "Whether the last poll of the lease service worked"
        )
        up.add_metric([], 0.0 if view.get("error") or view.get("summary") is None else 1.0)
        yield up
        summary = view.get("summary")
        if summary is None:
            return
        leases = GaugeMetricFamily(
            "dbguard_projects", "Projects the lease service knows, by state", labels=["state"]
        )
        for state in STATES:
            leases.add_metric([state], float(summary.get(state, 0)))
        yield leases
        yield GaugeMetricFamily(
            "dbguard_orphaned_projects",
            "Projects orphaned with unflushed data",
            value=float(summary["orphaned"]),
        )
        yield GaugeMetricFamily(
            "dbguard_stranded_bytes",
            "Unflushed bytes on the former holders of orphaned projects, as last reported",
            value=float(summary["stranded_bytes"]),
        )
        yield GaugeMetricFamily(
            "dbguard_hosts_alive",
            "Hosts holding, reading or waiting for a lease",
            value=float(summary["hosts_alive"]),
        )
        yield GaugeMetricFamily(
            "dbguard_waiting", "Hosts queued for a writer lease", value=float(summary["waiting"])
        )
        unflushed = GaugeMetricFamily(
            "dbguard_unflushed_bytes", "Unflushed bytes per holder host, as last reported", labels=["host"]
        )
        per_host: dict[str, float] = {}
        for row in view["projects"]:
            writer = row.get("writer")
            if writer and row["state"] in ("held", "orphaned"):
                host = str(writer.get("host"))
                per_host[host] = per_host.get(host, 0.0) + float(writer.get("unflushed") or 0)
        for host, size in sorted(per_host.items()):
            unflushed.add_metric([host], size)
        yield unflushed
        latency = self.watcher.hello.get("latency") or {}
        for name, what in (("grant", "a write lease grant"), ("renew", "a heartbeat")):
            buckets = latency.get(name)
            if not isinstance(buckets, dict):
                continue
            bounds, counts = buckets.get("bounds") or [], buckets.get("counts") or []
            if len(counts) != len(bounds) + 1:
                continue
            pairs = [(_bound(b), float(c)) for b, c in zip(bounds, counts, strict=False)]
            pairs.append(("+Inf", float(counts[-1])))
            yield HistogramMetricFamily(
                f"dbguard_{name}_seconds",
                f"Seconds the broker took to answer {what}, its disk sync included",
                buckets=pairs,
                sum_value=float(buckets.get("sum") or 0.0),
            )


def _bound(value: Any) -> str:
    return repr(float(value))
