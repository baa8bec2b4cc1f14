"""Publish events in order, retry what failed transiently, record every outcome.

The dispatcher owns the rules of one publish round: poison is set aside as dead at once; events
of a held slot or an isolated topic stay ``pending``; it publishes through its worker's
:class:`~mongo_outbox.relay._publishing.FencedPublisher` (fenced by the lease, within it);
transient failures are retried in place with backoff until their topic is isolated; permanent
ones count an attempt (see :func:`~mongo_outbox.relay._ordering.classify`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._cloudlog import TRACEPARENT
from .._document import Event, Poison
from .._errors import NotSentError, PublishError, TransientPublishError
from .._message import message_lane as message_slot
from .._retry import Backoff
from .._store import Failure, OutboxStore
from .._times import utcnow
from .._trace_context import ATTR_TRACEPARENT
from ..publishers import Publisher
from ._config import RelayConfig
from ._gate import KeyGate, TopicBreaker
from ._metrics import RelayMetrics
from ._ordering import Outcome, classify
from ._pipelining import Marker
from ._stats import RelayStats

__all__ = ["Dispatcher"]

log = logging.getLogger("mongo_outbox.relay")


class Dispatcher:
    """Publishes batches of events for one relay and marks their outcomes in the background."""

    def __init__(
        self,
        publisher: Publisher,
        store: OutboxStore,
        config: RelayConfig,
        stats: RelayStats,
        metrics: RelayMetrics | None = None,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self._publisher = publisher
        self._store = store
        self._config = config
        self._stats = stats
        self._metrics = metrics or RelayMetrics("-", "-")
        self._on_progress = on_progress
        self._stop = threading.Event()
        #: created_at to confirmation of the last event published (seconds).
        self.last_lag: float | None = None
        self.gate = KeyGate()
        self.breaker = TopicBreaker(
            config.isolate_after, Backoff(config.transient_max, max(config.retry_max, 1.0))
        )
        self._transient = Backoff(config.transient_initial, config.transient_max)
        self._retry = Backoff(config.retry_initial, config.retry_max)
        self._marker = Marker(store, on_dead=self._metrics.set_dead)

    def start(self, stop: threading.Event) -> None:
        """Begin a pipeline run (a fresh marker) that ``stop`` ends."""
        self._stop = stop
        self._marker = Marker(self._store, on_dead=self._metrics.set_dead)

    def flush(self) -> None:
        """Wait until every outcome is written (raises the first write error)."""
        self._marker.flush()

    def check(self) -> None:
        """Raise at once the error a background mark hit (the pipeline then restarts)."""
        self._marker.check()

    def close(self) -> None:
        """Write what is queued and stop the marker thread."""
        self._marker.close()

    @property
    def held(self) -> frozenset[str]:
        """The slots whose events wait now."""
        return self.gate.held

    @property
    def held_count(self) -> int:
        """How many slots wait now."""
        return len(self.gate)

    def hold(self, slots: Iterable[str]) -> None:
        """Make the events of ``slots`` wait (a sweep found them behind an earlier one)."""
        self.gate.hold(slots)

    def release_holds(self) -> None:
        """Let every slot go: a sweep is about to rebuild the holds, or they are another
        relay's now."""
        self.gate.replace(())

    def dispatch(self, records: Sequence[Event | Poison]) -> set[Any]:
        """Publish ``records`` in order; return the ids published or set aside as dead."""
        handled: set[Any] = set()
        poison: list[Failure] = []
        ready: list[Event] = []
        hold_dead = self._config.dead_key_policy == "hold"
        # The common case: nothing held, no topic isolated, so no slot needs working out.
        clear = not self.gate and self.breaker.clear()
        for record in records:
            if isinstance(record, Poison):
                if record.event_id is None:
                    log.error(
                        "an outbox document whose _id cannot be decoded cannot be set aside: "
                        "remove it by hand (%s)",
                        record.reason,
                    )
                    continue
                poison.append(Failure(record.event_id, record.attempts + 1, record.reason, None))
                handled.add(record.event_id)
                if hold_dead and record.slot is not None:
                    self.gate.hold([record.slot])  # its later events wait until it is requeued
                    clear = False
                log.error(
                    "outbox document %r set aside as dead: %s",
                    record.event_id,
                    record.reason,
                    extra={"event_id": record.event_id},
                )
                continue
            if clear:
                ready.append(record)
                continue
            slot = message_slot(record.message)
            if not self.gate.admits(slot):
                continue  # stays pending; a sweep publishes it after the event in front
            if not self.breaker.allows(record.message.topic):
                if slot is not None:
                    self.gate.hold([slot])
                continue  # its topic is isolated; a sweep retries it later
            ready.append(record)
        if poison:
            self._marker.submit([], utcnow(), poison)
            self._stats.dead += len(poison)
            self._metrics.dead.inc(len(poison))
            self._on_progress()
        if ready:
            handled.update(self._publish(ready))
        return handled

    def _publish(self, events: list[Event]) -> list[Any]:
        handled: list[Any] = []
        pending = events
        rounds = 0
        while pending:
            log.debug("publishing %d event(s)", len(pending))
            results = self._publisher.publish([e.message for e in pending])
            now = utcnow()
            outcome = classify(
                pending,
                results,
                now=now,
                max_attempts=self._config.max_attempts,
                retry=self._retry,
                hold_dead=self._config.dead_key_policy == "hold",
            )
            self._marker.submit(outcome.published, now, outcome.failures)
            handled.extend(outcome.published)
            handled.extend(f.event_id for f in outcome.failures if f.next_attempt_at is None)
            self._stats.published += len(outcome.published)
            self._stats.failed += len(outcome.failures) - outcome.dead
            self._stats.dead += outcome.dead
            self._record(pending, results, outcome)
            if outcome.failures:
                attributes = {e.message.event_id: e.message.attributes for e in pending}
            for failure in outcome.failures:
                log.warning(
                    "event %s failed (attempt %d%s): %s",
                    failure.event_id,
                    failure.attempts,
                    ", now dead" if failure.next_attempt_at is None else "",
                    failure.error,
                    extra={
                        "event_id": failure.event_id,
                        # The event's trace context, for the JSON log's trace fields.
                        TRACEPARENT: attributes[failure.event_id].get(ATTR_TRACEPARENT),
                    },
                )
            for topic in outcome.succeeded_topics:
                self.breaker.succeeded(topic)
            self.gate.hold(outcome.blocked)
            failing = {
                e.message.topic
                for e, r in zip(pending, results, strict=True)
                if isinstance(r, TransientPublishError) and not isinstance(r, NotSentError)
            }
            pending = self._isolate(outcome.retry, failing)
            if pending:
                rounds += 1
                first = next((e for e in results if isinstance(e, TransientPublishError)), None)
                log.warning("%d events failed transiently (%s); retrying", len(pending), first)
                if self._transient.pause(rounds, self._stop):
                    break  # stopping: what is left stays pending for the next start
        return handled

    def _record(
        self, sent: list[Event], results: list[PublishError | None], outcome: Outcome
    ) -> None:
        """Metrics of one publish round; a beat of progress when anything was settled."""
        metrics = self._metrics
        if len(outcome.published) == len(sent):  # the common case: everything went
            confirmed = sent
        else:
            by_id = {e.message.event_id: e for e in sent}
            confirmed = [by_id[i] for i in outcome.published]
            topic_of = {i: e.message.topic for i, e in by_id.items()}
            metrics.failed((topic_of[f.event_id] for f in outcome.failures), "permanent")
            metrics.failed(
                (
                    e.message.topic
                    for e, r in zip(sent, results, strict=True)
                    if isinstance(r, TransientPublishError) and not isinstance(r, NotSentError)
                ),
                "transient",
            )
        metrics.published(e.message.topic for e in confirmed)
        now = time.time()
        lags = [max(0.0, now - e.created) for e in confirmed if e.created]
        if lags:
            metrics.event_lag.observe_many(lags)
            self.last_lag = lags[-1]
        metrics.dead.inc(outcome.dead)
        if outcome.published or outcome.failures:
            self._on_progress()

    def _isolate(self, retry: list[Event], failing: set[str | None]) -> list[Event]:
        """Drop the events of ``failing`` topics that have failed for too long; hold their
        slots."""
        isolated = {t for t in failing if self.breaker.failed(t)}
        if not isolated:
            return retry
        log.warning(
            "topic(s) %s keep failing transiently: isolated for now (their events wait, other "
            "topics go on)",
            ", ".join(sorted(t or "?" for t in isolated)),
        )
        kept = []
        for event in retry:
            if event.message.topic in isolated:
                slot = message_slot(event.message)
                if slot is not None:
                    self.gate.hold([slot])
            else:
                kept.append(event)
        return kept
