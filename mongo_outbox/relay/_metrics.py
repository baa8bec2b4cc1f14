"""The relay's Prometheus metrics (names are a contract: dashboards and alerts use them).

Every metric carries the labels ``outbox="<database>.<collection>"`` and ``relay="<name>"``;
in a relay group (``--partitions`` above 1) the per-partition gauges (checkpoint age, lease,
held keys) also carry ``partition="<index>"``, one series per partition this process owns.
Each relay has its own registry, so several relays in one process do not collide; the HTTP
side serves it, with the process metrics (``process_*``, ``python_*``) and
``mongo_outbox_build_info{version}``.

Counters have their series from the start, at 0, for the label values known then: so an alert
on ``increase(...)`` reads 0, not "no data". ``events_failed_total`` and
``events_published_total`` start with the relay's default topic (``topic=""`` without one) for
each ``kind``; other topics' series appear with their first event.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter as _Tally
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["BatchHistogram", "PartitionState", "RelayMetrics"]

_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True, slots=True)
class PartitionState:
    """What the per-partition gauges show of one partition."""

    partition: int | None
    checkpoint_age: float | None
    lease_active: bool
    held_keys: int


class RelayMetrics:
    """Counters, gauges and histograms of one relay, in their own registry."""

    def __init__(
        self,
        outbox: str,
        relay: str,
        *,
        partitioned: bool = False,
        topics: Iterable[str | None] = (None,),
    ) -> None:
        from .. import __version__

        self.registry = CollectorRegistry(auto_describe=True)
        base = ["outbox", "relay"]
        self._labels = {"outbox": outbox, "relay": relay}
        self.partitioned = partitioned
        own = [*base, "partition"] if partitioned else base
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
        self.event_lag = BatchHistogram(
            "mongo_outbox_event_lag_seconds",
            "Time from an event's created_at to its confirmation by Pub/Sub",
            self._labels,
            _LAG_BUCKETS,
        )
        r.register(self.event_lag)
        self.pending = gauge("mongo_outbox_pending_events", "Pending events (sampled)")
        self.dead_events = gauge("mongo_outbox_dead_events", "Dead events (sampled)")
        self.oldest_pending_age = gauge(
            "mongo_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event, 0 when none (sampled)",
        )
        self._checkpoint_age = Gauge(
            "mongo_outbox_checkpoint_age_seconds",
            "Time since this relay last saved its resume token (absent before its first save)",
            own,
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
        self._lease_active = Gauge(
            "mongo_outbox_lease_active",
            "1 while this process holds the lease, else 0",
            own,
            registry=r,
        )
        self.restarts = Counter(
            "mongo_outbox_pipeline_restarts_total",
            "Pipeline restarts after errors",
            base,
            registry=r,
        ).labels(**self._labels)
        self._held_keys = Gauge(
            "mongo_outbox_held_keys",
            "(topic, key) slots held behind a failed event",
            own,
            registry=r,
        )
        Info("mongo_outbox_build", "The mongo-outbox version", base, registry=r).labels(
            **self._labels
        ).info({"version": __version__})
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(_GC)
        for topic in {_topic_id(t) for t in topics}:
            self._published.labels(**self._labels, topic=topic)
            for kind in ("transient", "permanent"):
                self._failed.labels(**self._labels, topic=topic, kind=kind)
        self._per_partition = (self._checkpoint_age, self._lease_active, self._held_keys)
        self._shown: dict[Gauge, set[tuple[str, ...]]] = {g: set() for g in self._per_partition}
        self._partition_lock = threading.Lock()

    def published(self, topics: Iterable[str | None]) -> None:
        """Count confirmed events, one topic per event."""
        for topic, n in _Tally(_topic_id(t) for t in topics).items():
            self._published.labels(**self._labels, topic=topic).inc(n)

    def set_dead(self, n: int) -> None:
        """The relay itself set ``n`` events dead: the gauge moves now, not at the next sample
        (which then sets the count it reads)."""
        if n:
            self.dead_events.inc(n)

    def failed(self, topics: Iterable[str | None], kind: str) -> None:
        """Count failed attempts (``kind`` ``transient`` or ``permanent``), one topic each."""
        for topic, n in _Tally(_topic_id(t) for t in topics).items():
            self._failed.labels(**self._labels, topic=topic, kind=kind).inc(n)

    def partitions(self, rows: Iterable[PartitionState]) -> None:
        """Set the per-partition gauges: one row per partition this process works on (one row,
        partition None, for a relay without partitions). A checkpoint age of None (not saved
        by this process yet) leaves its series out, and so does a partition given back.

        Series are set, then the stale ones removed, never cleared first: a scrape running at
        the same time sees every live series."""
        wanted: dict[Gauge, set[tuple[str, ...]]] = {g: set() for g in self._per_partition}
        for row in rows:
            labels = dict(self._labels)
            if self.partitioned:
                labels["partition"] = str(row.partition)
            key = tuple(labels.values())
            values = (
                (self._checkpoint_age, row.checkpoint_age),
                (self._lease_active, 1 if row.lease_active else 0),
                (self._held_keys, row.held_keys),
            )
            for gauge, value in values:
                if value is not None:
                    gauge.labels(*key).set(value)
                    wanted[gauge].add(key)
        with self._partition_lock:  # two scrapes may refresh at once
            for gauge, keys in wanted.items():
                for stale in self._shown[gauge] - keys:
                    gauge.remove(*stale)
                self._shown[gauge] = keys

    def oplog(self, window: float | None, headroom: float | None) -> None:
        """Set the oplog gauges; None removes one (absent rather than wrong)."""
        for gauge, value in ((self._oplog_window, window), (self._oplog_headroom, headroom)):
            if value is None:
                gauge.clear()
            else:
                gauge.labels(**self._labels).set(value)


# The process-wide GC collector, registered in each relay's registry (it reads the interpreter).
_GC = GC_COLLECTOR


def _topic_id(topic: str | None) -> str:
    """The topic id, whether the event named it by id or by full path: one series per topic."""
    return (topic or "").rsplit("/", 1)[-1]


class BatchHistogram(Collector):
    """A histogram fed a batch at a time: one lock per batch instead of two per value.

    The relay observes one lag per event; prometheus-client's ``Histogram.observe`` costs
    about 1.7 µs a value, a twentieth of the relay's whole cost per event.
    """

    def __init__(
        self, name: str, documentation: str, labels: Mapping[str, str], buckets: Iterable[float]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = dict(labels)
        self._bounds = sorted(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Iterable[float]) -> None:
        """Count each of ``values``."""
        bounds, counts = self._bounds, [0] * len(self._counts)
        total = 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
            total += value
        with self._lock:
            for i, n in enumerate(counts):
                self._counts[i] += n
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The histogram in Prometheus' form: cumulative buckets, sum and count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self._name, self._documentation, labels=list(self._labels))
        cumulative, buckets = 0, []
        for bound, n in zip([*self._bounds, float("inf")], counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric(list(self._labels.values()), buckets, total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        """Registered without a first collect."""
        yield HistogramMetricFamily(self._name, self._documentation, labels=list(self._labels))
