"""The relay's Prometheus metrics (names are a contract: dashboards and alerts use them).

Every metric carries the labels ``outbox="<database>.<collection>"`` and ``relay="<name>"``.
Each relay has its own registry, so several relays in one process do not collide; the HTTP
side serves it.
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RelayMetrics"]

_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RelayMetrics:
    """Counters, gauges and histograms of one relay, in their own registry."""

    def __init__(self, outbox: str, relay: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        base = ["outbox", "relay"]
        self._labels = {"outbox": outbox, "relay": relay}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, base, registry=r).labels(**self._labels)

        self._published = Counter(
            "mongo_outbox_events_published_total",
            "Events confirmed by Pub/Sub",
            [*base, "topic"],
            registry=r,
        )
        self._failed = Counter(
            "mongo_outbox_events_failed_total",
            "Failed publish attempts",
            [*base, "topic", "kind"],
            registry=r,
        )
        self.dead = Counter(
            "mongo_outbox_events_dead_total", "Events set dead (poison included)", base, registry=r
        ).labels(**self._labels)
        self.publish_duration = Histogram(
            "mongo_outbox_publish_duration_seconds",
            "One Publish request (one publish call, for publishers that do not time requests)",
            base,
            buckets=_PUBLISH_BUCKETS,
            registry=r,
        ).labels(**self._labels)
        self.event_lag = Histogram(
            "mongo_outbox_event_lag_seconds",
            "Time from an event's created_at to its confirmation by Pub/Sub",
            base,
            buckets=_LAG_BUCKETS,
            registry=r,
        ).labels(**self._labels)
        self.pending = gauge("mongo_outbox_pending_events", "Pending events (sampled)")
        self.dead_events = gauge("mongo_outbox_dead_events", "Dead events (sampled)")
        self.oldest_pending_age = gauge(
            "mongo_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event, 0 when none (sampled)",
        )
        self._checkpoint_age = Gauge(
            "mongo_outbox_checkpoint_age_seconds",
            "Time since this relay last saved its resume token (absent before its first save)",
            base,
            registry=r,
        )
        # Unlabelled until known: absent where the oplog cannot be read.
        self._oplog_window = Gauge(
            "mongo_outbox_oplog_window_seconds",
            "Newest minus oldest oplog entry time",
            base,
            registry=r,
        )
        self._oplog_headroom = Gauge(
            "mongo_outbox_oplog_headroom_seconds",
            "Checkpoint's cluster time minus the oldest oplog entry time (0: token lost)",
            base,
            registry=r,
        )
        self.lease_active = gauge(
            "mongo_outbox_lease_active", "1 while this process holds the lease, else 0"
        )
        self.restarts = Counter(
            "mongo_outbox_pipeline_restarts_total",
            "Pipeline restarts after errors",
            base,
            registry=r,
        ).labels(**self._labels)
        self.held_keys = gauge(
            "mongo_outbox_held_keys", "(topic, key) slots held behind a failed event"
        )

    def published(self, topics: Iterable[str | None]) -> None:
        """Count confirmed events, one topic per event."""
        for topic, n in _Tally(topics).items():
            self._published.labels(**self._labels, topic=topic or "").inc(n)

    def failed(self, topics: Iterable[str | None], kind: str) -> None:
        """Count failed attempts (``kind`` ``transient`` or ``permanent``), one topic each."""
        for topic, n in _Tally(topics).items():
            self._failed.labels(**self._labels, topic=topic or "", kind=kind).inc(n)

    def checkpoint(self, age: float | None) -> None:
        """Set the checkpoint age; None (not saved by this relay yet) removes it."""
        if age is None:
            self._checkpoint_age.clear()
        else:
            self._checkpoint_age.labels(**self._labels).set(age)

    def oplog(self, window: float | None, headroom: float | None) -> None:
        """Set the oplog gauges; None removes one (absent rather than wrong)."""
        for gauge, value in ((self._oplog_window, window), (self._oplog_headroom, headroom)):
            if value is None:
                gauge.clear()
            else:
                gauge.labels(**self._labels).set(value)
