"""Sweeps: read the ``pending`` events in ``_id`` order and publish those that may go now.

The start-up sweep takes every due event; periodic sweeps leave young events to the change
stream and pick up stragglers, due retries and the events held behind a failure. A snapshot
that grows too old while a long sweep reads it (SnapshotTooOld) is left for a new one that
resumes after the last ``_id`` handled, never from the start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bson import Timestamp
from pymongo.errors import OperationFailure

from .._document import Event, Poison, decode_batch, to_event
from .._document import lane_of as slot_of
from .._partition import Partition
from .._store import OutboxStore, sweep_position
from .._times import utcnow
from ._config import RelayConfig
from ._dispatch import Dispatcher
from ._ordering import SweepFilter
from ._pipelining import prefetch

__all__ = ["SweepResult", "Sweeper"]

log = logging.getLogger("mongo_outbox.relay")

_SNAPSHOT_TOO_OLD = 239


@dataclass
class SweepResult:
    """What a sweep handled, and the cluster time its last read was at."""

    handled: set[Any] = field(default_factory=set)
    read_at: Timestamp | None = None
    done: float = 0.0
    resumed: int = 0


class Sweeper:
    """Sweeps one outbox through a :class:`Dispatcher`, batches bounded by count and bytes."""

    def __init__(
        self,
        store: OutboxStore,
        dispatcher: Dispatcher,
        config: RelayConfig,
        cluster_time: Callable[[], Timestamp],
        partition: Partition,
        turn: threading.Lock | None = None,
    ) -> None:
        self._partition = partition
        # Sweeps sharing a turn run one at a time: a group member's partitions read ahead
        # (two server batches of up to 16 MiB each) one sweep's worth, not one per partition.
        self._turn = turn or threading.Lock()
        self._store = store
        self._dispatcher = dispatcher
        self._config = config
        self._cluster_time = cluster_time

    def _slot(self, doc: Any) -> str | None:
        return slot_of(doc, self._config.default_topic)

    def sweep(self, *, grace: float | None, at: Timestamp, stop: threading.Event) -> SweepResult:
        """Publish the admissible pending events as of cluster time ``at`` (after the sweeps
        sharing this sweeper's turn that are running now)."""
        while not self._turn.acquire(timeout=0.2):
            if stop.is_set():
                return SweepResult(read_at=at, done=time.monotonic())
        try:
            return self._sweep(grace, at, stop)
        finally:
            self._turn.release()

    def _sweep(self, grace: float | None, at: Timestamp, stop: threading.Event) -> SweepResult:
        config, partition = self._config, self._partition
        dispatcher = self._dispatcher
        dead = self._store.dead_keys() if config.dead_key_policy == "hold" else ()
        dead_slots = [s for t, k in dead if (s := self._slot({"topic": t, "key": k}))]
        filt = SweepFilter(utcnow(), grace, dispatcher.held, dead_slots, lane=self._slot)
        # The stream is not consumed during a sweep: the holds are rebuilt from what it finds.
        dispatcher.release_holds()
        result = SweepResult(read_at=at)
        batch: list[Event | Poison] = []
        size = 0
        after: Any = None
        while not stop.is_set():
            try:
                for raws in prefetch(
                    self._store.pending_batches(
                        config.batch_size, at=result.read_at, after=after, partition=partition
                    ),
                    depth=2,
                ):
                    for raw, doc in zip(
                        raws, decode_batch(raws, config.default_topic), strict=True
                    ):
                        if stop.is_set():
                            break
                        if isinstance(doc, Poison):
                            # A partition's position needs the slot too: a resume there reads
                            # this document again (it is set dead again, harmlessly).
                            if partition.whole and doc.event_id is not None:
                                after = doc.event_id
                        elif doc.get("_id") is not None:
                            after = sweep_position(partition, doc)
                        if isinstance(doc, dict) and not filt.admit(doc):
                            continue
                        record = to_event(doc, config.default_topic, len(raw.raw), config.format)
                        batch.append(record)
                        size += record.size
                        if len(batch) >= config.batch_size or size >= config.max_batch_bytes:
                            result.handled |= dispatcher.dispatch(batch)
                            batch, size = [], 0
                    if stop.is_set():
                        break
                break
            except OperationFailure as exc:
                if exc.code != _SNAPSHOT_TOO_OLD:
                    raise
                result.resumed += 1
                result.read_at = self._cluster_time()
                log.warning(
                    "sweep snapshot became too old; resuming after _id %r at a newer one", after
                )
        if batch and not stop.is_set():
            result.handled |= dispatcher.dispatch(batch)
        dispatcher.hold(filt.waiting)
        result.done = time.monotonic()
        return result
