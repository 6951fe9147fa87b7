"""Prometheus metrics of the bridge (served on /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BridgeMetrics:
    """One registry per bridge, so tests can run several bridges in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("bridge_received", "Notifications or files seen", registry=r)
        self.emitted = Counter("bridge_emitted", "Events sent to Prefect", registry=r)
        self.stored = Counter("bridge_stored", "Events confirmed stored by Prefect", registry=r)
        self.acked = Counter("bridge_acked", "Sources acknowledged after storage", registry=r)
        self.nacked = Counter("bridge_nacked", "Sources released for redelivery", registry=r)
        self.ignored = Counter("bridge_ignored", "Notifications outside our scope", registry=r,
                               labelnames=["why"])
        self.rejected = Counter("bridge_rejected", "Notifications that can never be events",
                                registry=r, labelnames=["why"])
        self.resent = Counter("bridge_resent", "Events emitted again, not stored in time",
                              registry=r)
        self.pending = Gauge("bridge_pending", "Events emitted, not yet confirmed", registry=r)
        self.held = Gauge("bridge_held", "Events held unemitted while the server is unreachable "
                          "(their sources neither acked nor nacked)", registry=r)
        self.oldest_held = Gauge(
            "bridge_oldest_held_seconds",
            "Age of the oldest source (Pub/Sub message) neither acked nor nacked: its event "
            "not yet stored, e.g. during a Prefect outage; alert well before the "
            "subscription's message retention (TAXI_PUBSUB_MAX_HOLD_SECONDS)",
            registry=r)
        self.emit_failures = Counter("bridge_emit_failures",
                                     "Emits that failed; held events are retried with backoff",
                                     registry=r)
        self.hold_expired = Counter("bridge_hold_expired",
                                    "Events whose sources were nacked after the longest hold",
                                    registry=r)
        self.emit_latency = Histogram(
            "bridge_store_latency_seconds",
            "Seconds from receiving a notification to its event being confirmed stored",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (for logs and tests)."""
        sample = self.registry.get_sample_value(f"bridge_{name}_total", labels or None)
        if sample is None:
            sample = self.registry.get_sample_value(f"bridge_{name}", labels or None)
        return sample or 0.0
