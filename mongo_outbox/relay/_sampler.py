"""Samples what needs a query (counts, oldest pending, oplog window) off the hot path.

A thread of its own, every ``interval`` seconds: the gauges, the readiness of the relay (MongoDB
answers, the outbox collection exists) and the oplog headroom warning come from here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pymongo.errors import PyMongoError

from .._document import STATUS_DEAD, STATUS_PENDING
from .._mongo_errors import outbox_missing
from .._oplog import headroom, read_oplog_window
from .._store import OutboxStore, count_by_status, oldest_pending
from .._times import age_of
from ._health import Health
from ._metrics import RelayMetrics

__all__ = ["Sampler"]

log = logging.getLogger("mongo_outbox.relay")


class Sampler:
    """Keeps the sampled gauges and the readiness of one relay up to date."""

    def __init__(
        self,
        store: OutboxStore,
        token: Callable[[], Mapping[str, Any] | None],
        metrics: RelayMetrics,
        health: Health,
        interval: float,
    ) -> None:
        self._store = store
        self._token = token
        self._metrics = metrics
        self._health = health
        self.interval = interval
        #: Pending events at the last sample (None before the first).
        self.pending: int | None = None
        self._low_headroom = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Sample now and then every ``interval`` seconds until :meth:`stop`."""
        self._halt.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (waits for a sample in progress)."""
        self._halt.set()
        if self._thread is not None:
            # A sample blocked on a server that does not answer must not hold up shutdown.
            self._thread.join(timeout=5.0)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except PyMongoError as exc:
                self._health.readiness(f"MongoDB does not answer: {type(exc).__name__}")
            except Exception:  # a sampler must never die: the gauges would freeze
                log.exception("sampling the outbox failed")
            if self._halt.wait(self.interval):
                return

    def sample(self) -> None:
        """Take one sample."""
        store, metrics = self._store, self._metrics
        missing = outbox_missing(store.outbox)
        self._health.readiness(missing)
        if missing is not None:
            return
        counts = count_by_status(store.outbox, (STATUS_PENDING, STATUS_DEAD))
        pending, dead = counts[STATUS_PENDING], counts[STATUS_DEAD]
        oldest = oldest_pending(store.outbox)
        # Set together, after the queries: a scrape sees one sample, not half of two.
        metrics.pending.set(pending)
        metrics.dead_events.set(dead)
        age = age_of(oldest.get("created_at")) if oldest else None
        metrics.oldest_pending_age.set(max(0.0, age or 0.0))
        self.pending = pending
        self._sample_oplog()

    def _sample_oplog(self) -> None:
        window = read_oplog_window(self._store.db.client)
        room = headroom(self._token(), window)
        self._metrics.oplog(window.seconds, room)
        seconds = window.seconds
        if room is None or not seconds:
            return
        low = room < seconds / 4
        if low and not self._low_headroom:
            log.warning(
                "oplog headroom low: the checkpoint is %.0fs from the oldest oplog entry, in a "
                "%.0fs window; if history passes it the relay recovers by a full sweep (grow the "
                "oplog, or find what holds the relay back)",
                room,
                seconds,
            )
        self._low_headroom = low
