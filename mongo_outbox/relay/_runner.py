"""The relay loop: change stream plus sweeps, batch, publish, confirm, mark, checkpoint.

Start-up (and every restart of the pipeline after an error) is the same gap-free procedure:

1. open the change stream after the saved resume token, or, without a usable token, at the
   cluster time read just before;
2. read the cluster time T and sweep every ``pending`` event as of T (a snapshot read), in
   ``_id`` order, publishing them;
3. consume the stream, skipping changes at or before T (the sweep covered them).

Opening the stream before the sweep is what leaves no gap between the two.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from bson import ObjectId, Timestamp
from bson.errors import InvalidDocument
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from .._errors import (
    ConfigurationError,
    LeaseLostError,
    PoisonEventError,
    TransientPublishError,
)
from .._event import Message, attempts_of, message_from_document, utcnow
from .._store import PUBLISH_PROJECTION, Failure, OutboxStore
from ..publishers import Publisher
from ._config import RelayConfig
from ._lease import Lease, new_owner_id
from ._ordering import SweepFilter, classify, message_slot, slot_of
from ._pipelining import Marker, prefetch
from ._tailer import Change, Idle, StreamFailed, Tailer

__all__ = ["Relay", "RelayStats"]

log = logging.getLogger("mongo_outbox.relay")


@dataclass
class RelayStats:
    """Counters since the relay started."""

    published: int = 0
    failed: int = 0
    dead: int = 0
    skipped_duplicates: int = 0
    recoveries: int = 0
    restarts: int = 0


_CHANGE_PROJECTION: dict[str, int] = {
    "_id": 1,
    "clusterTime": 1,
    **{f"fullDocument.{field}": 1 for field in ("_id", *PUBLISH_PROJECTION)},
}


class _StreamError(Exception):
    """The change stream failed while being read."""


class _Retry(Exception):
    """Some messages failed transiently and go again."""


class Relay:
    """Moves committed outbox events to a :class:`~mongo_outbox.publishers.Publisher`.

    ``client`` must reach a replica set (or sharded cluster). Call :meth:`run` with a
    :class:`threading.Event` to stop it, or :meth:`run_once` to drain what is pending.
    """

    def __init__(self, client: MongoClient[Any], publisher: Publisher, config: RelayConfig) -> None:
        self.client = client
        self.publisher = publisher
        self.config = config
        self.store = OutboxStore(client[config.database], config.collection)
        self.stats = RelayStats()
        self._stop = threading.Event()
        self._token: Mapping[str, Any] | None = None
        self._token_loaded = False
        self._saved_token: Mapping[str, Any] | None = None
        self._saved_at = 0.0
        # Keys whose earliest pending event is not due yet: the stream holds their events.
        self._blocked: set[str] = set()
        # Ids published by the last periodic sweep, and the time it read at.
        self._swept: set[ObjectId] = set()
        self._swept_at: Timestamp | None = None
        self._swept_done = 0.0
        # Changes at or before this time were covered by the start-up sweep.
        self._covered_until: Timestamp | None = None
        self.lease = Lease(
            self.store.state, config.name, config.owner or new_owner_id(), config.lease_ttl
        )
        self._fence: int | None = None
        self._marker = Marker(self.store)

    def _slot(self, doc: Mapping[str, Any]) -> str | None:
        return slot_of(doc, self.config.default_topic)

    # -- public --------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Relay until ``stop`` is set; connection losses are ridden out with backoff.

        Waits as a standby while another relay holds the lease of this outbox and name.
        """
        if stop is not None:
            self._stop = stop
        failures = 0
        try:
            while not self._stop.is_set():
                if not self._await_lease(timeout=None):
                    break
                with self._renewing():
                    failures = self._run_pipeline(failures)
        finally:
            self._release_lease()

    def _run_pipeline(self, failures: int) -> int:
        """One pipeline run; returns the count of consecutive failures."""
        try:
            self._pipeline(once=False)
            return 0
        except LeaseLostError as exc:
            log.warning("%s: stopped publishing; back to standby", exc)
            return failures
        except (PyMongoError, _StreamError) as exc:
            if isinstance(exc, OperationFailure) and exc.code in (13, 18):
                raise ConfigurationError(f"MongoDB refused the relay: {exc}") from exc
            if isinstance(exc, _StreamError) and isinstance(exc.__cause__, OperationFailure):
                # The server refused to go on from our position (history lost, invalid
                # token...). Recovery from the cluster time is always safe.
                self._token = None
            failures += 1
            self.stats.restarts += 1
            delay = min(
                self.config.transient_max, self.config.transient_initial * 2 ** min(failures, 8)
            )
            log.warning("relay pipeline failed (%s); restarting in %.1fs", exc, delay)
            self._stop.wait(delay)
            return failures

    def run_once(self) -> int:
        """Publish everything pending and everything committed so far, then return.

        Returns the number of events published. Raises :class:`LeaseLostError` when another
        relay holds the lease for longer than one lease period (it is doing the work).
        """
        before = self.stats.published
        try:
            if not self._await_lease(timeout=self.config.lease_ttl + 1.0):
                raise LeaseLostError(
                    f"another relay holds the lease of {self.config.name!r}: it is publishing"
                )
            with self._renewing():
                self._pipeline(once=True)
        finally:
            self._release_lease()
        return self.stats.published - before

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch, checkpoint and return."""
        self._stop.set()

    # -- lease ---------------------------------------------------------------------------

    def _await_lease(self, timeout: float | None) -> bool:
        """Wait as a standby until the lease is ours; False if stopped or timed out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        announced = False
        while not self._stop.is_set():
            previous = self._fence
            try:
                if self.lease.try_acquire():
                    self._fence = self.lease.fence
                    if self._fence != previous:
                        # Another relay may have moved on meanwhile: start from its checkpoint.
                        self._token_loaded = False
                        self._blocked = set()
                    return True
            except PyMongoError as exc:
                log.warning("cannot reach MongoDB to take the lease: %s", exc)
            if not announced:
                log.info("standby: another relay holds the lease of %r", self.config.name)
                announced = True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._stop.wait(min(1.0, self.config.lease_ttl / 4))
        return False

    @contextmanager
    def _renewing(self) -> Iterator[None]:
        halt = threading.Event()

        def renew() -> None:
            while not halt.wait(self.config.lease_ttl / 4):
                try:
                    if not self.lease.renew():
                        return
                except PyMongoError as exc:
                    log.warning("lease renewal failed: %s", exc)

        thread = threading.Thread(target=renew, name="outbox-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            halt.set()
            thread.join()

    def _release_lease(self) -> None:
        try:
            self.lease.release()
        except PyMongoError as exc:
            log.warning("could not release the lease (it expires by itself): %s", exc)

    # -- pipeline ------------------------------------------------------------------------

    def _pipeline(self, *, once: bool) -> None:
        if not self._token_loaded:
            self._token = self.store.load_state(self.config.name).get("resume_token")
            self._saved_token = self._token
            self._token_loaded = True
        stream = self._open_stream(once=once)
        opened_at = stream.resume_token
        tailer = Tailer(stream, self.config.queue_size)
        tailer.start()
        self._marker = Marker(self.store)
        try:
            at = self._cluster_time()
            self._covered_until = at
            self._sweep(grace=None, at=at)
            if self._token is None:
                # The sweep covered everything committed before the stream opened, so its
                # opening position is already a safe checkpoint.
                self._token = opened_at
                self._checkpoint(force=True)
            started = time.monotonic()
            next_sweep = started + self.config.sweep_interval
            while not self._stop.is_set():
                idle = self._consume(tailer)
                if once and idle is not None and idle > started:
                    break
                if time.monotonic() >= next_sweep:
                    # Marks still in flight would make published events look pending.
                    self._marker.flush()
                    self._sweep(grace=self.config.sweep_grace, at=self._cluster_time())
                    next_sweep = time.monotonic() + self.config.sweep_interval
            self._marker.flush()
        finally:
            tailer.stop()
            self._marker.close()
        self._checkpoint(force=True)

    def _open_stream(self, *, once: bool = False) -> Any:
        pipeline: list[dict[str, Any]] = [
            {"$match": {"operationType": "insert"}},
            # Only what publishing needs: decoding change events is the tailer's main cost.
            {"$project": _CHANGE_PROJECTION},
        ]
        # --once stops at the first empty getMore: no reason to wait long for it.
        await_seconds = (
            min(self.config.max_await_seconds, 0.1) if once else (self.config.max_await_seconds)
        )
        options: dict[str, Any] = {
            "max_await_time_ms": int(await_seconds * 1000),
            "batch_size": self.config.batch_size,
        }
        if self._token is not None:
            try:
                stream = self.store.outbox.watch(pipeline, start_after=self._token, **options)
                log.info("resumed change stream from checkpoint")
                return stream
            except (OperationFailure, InvalidDocument, TypeError, ValueError) as exc:
                log.warning(
                    "saved resume token is unusable (%s: %s): recovering by a full sweep",
                    type(exc).__name__,
                    exc,
                )
                self._token = None
        else:
            log.info("no checkpoint: recovering by a full sweep")
        self.stats.recoveries += 1
        at = self._cluster_time()
        return self.store.outbox.watch(pipeline, start_at_operation_time=at, **options)

    def _cluster_time(self) -> Timestamp:
        with self.client.start_session(causal_consistency=False) as session:
            self.store.db.command("ping", session=session)
            at: Timestamp | None = session.operation_time
        if at is None:
            raise ConfigurationError("the server reports no cluster time: is it a replica set?")
        return at

    # -- consuming the stream ------------------------------------------------------------

    def _consume(self, tailer: Tailer) -> float | None:
        """Take one batch from the stream and publish it; return the time of an idle mark."""
        try:
            first = tailer.queue.get(timeout=0.2)
        except queue.Empty:
            return None
        items = [first]
        while len(items) < self.config.batch_size:
            try:
                items.append(tailer.queue.get_nowait())
            except queue.Empty:
                break
        docs: list[dict[str, Any]] = []
        idle_at: float | None = None
        failure: BaseException | None = None
        token = self._token
        for item in items:
            if isinstance(item, StreamFailed):
                failure = item.error
                break
            if isinstance(item, Idle):
                idle_at = item.at
                token = item.token
                if item.at > self._swept_done:
                    self._swept.clear()
                continue
            token = item.token
            if self._skip(item):
                continue
            docs.append(item.doc)
        if docs:
            self._publish_stream_docs(docs)
        self._token = token
        self._checkpoint(force=False)
        if failure is not None:
            raise _StreamError(f"change stream failed: {failure}") from failure
        return idle_at

    def _skip(self, change: Change) -> bool:
        ct = change.cluster_time
        if self._covered_until is not None and isinstance(ct, Timestamp):
            if ct <= self._covered_until:
                self.stats.skipped_duplicates += 1
                return True
            self._covered_until = None
        if self._swept:
            if self._swept_at is not None and isinstance(ct, Timestamp) and ct > self._swept_at:
                self._swept.clear()
            elif change.doc.get("_id") in self._swept:
                self.stats.skipped_duplicates += 1
                return True
        return False

    def _publish_stream_docs(self, docs: list[dict[str, Any]]) -> None:
        ready = []
        for doc in docs:
            key = self._slot(doc)
            if key is not None and key in self._blocked:
                continue  # stays pending; the sweep publishes it after the blocker
            ready.append(doc)
        self._publish(ready, held=self._blocked)

    # -- sweeping ------------------------------------------------------------------------

    def _sweep(self, *, grace: float | None, at: Timestamp) -> None:
        hold = self.config.dead_key_policy == "hold"
        dead = self.store.dead_keys() if hold else ()
        dead_slots = [slot_of({"topic": t, "key": k}, self.config.default_topic) for t, k in dead]
        filt = SweepFilter(
            utcnow(), grace, self._blocked, [s for s in dead_slots if s], slot=self._slot
        )
        # Keys that fail during the sweep are added back by _publish; the stream is not being
        # consumed meanwhile, so starting afresh is safe.
        self._blocked = set()
        swept: set[ObjectId] = set()
        batch: list[dict[str, Any]] = []
        size = self.config.batch_size
        for docs in prefetch(self.store.pending_batches(size, at=at), depth=2):
            if self._stop.is_set():
                break
            for doc in docs:
                if filt.admit(doc):
                    batch.append(doc)
                if len(batch) >= size:
                    swept.update(self._publish(batch, held=filt.held))
                    batch = []
        if batch and not self._stop.is_set():
            swept.update(self._publish(batch, held=filt.held))
        self._blocked |= filt.waiting
        # Accumulated, not replaced: a lagging stream may not have reached earlier sweeps' ids.
        # The set is cleared once the stream passes ``at`` (every id in it is at or before).
        self._swept |= swept
        self._swept_at = at
        self._swept_done = time.monotonic()

    # -- publishing ----------------------------------------------------------------------

    def _publish(self, docs: Sequence[Mapping[str, Any]], held: set[str]) -> set[ObjectId]:
        """Publish ``docs`` in order; return the ids that were published or set aside.

        Keys that fail permanently are added to ``held`` (and the relay's blocked keys).
        """
        handled: set[ObjectId] = set()
        sendable: list[tuple[Mapping[str, Any], Message]] = []
        poison: list[Failure] = []
        for doc in docs:
            key = self._slot(doc)
            if key is not None and key in held:
                continue
            try:
                message = message_from_document(doc)
            except PoisonEventError as exc:
                event_id = doc.get("_id")
                if isinstance(event_id, ObjectId):
                    poison.append(Failure(event_id, attempts_of(doc) + 1, f"poison: {exc}", None))
                    handled.add(event_id)
                log.error("outbox document %r set aside as dead: %s", event_id, exc)
                continue
            if message.topic is None:
                if self.config.default_topic is None:
                    poison.append(
                        Failure(
                            message.event_id,
                            attempts_of(doc) + 1,
                            "event has no topic and the relay has no default topic "
                            "(--default-topic): requeue it once one is set",
                            None,
                        )
                    )
                    handled.add(message.event_id)
                    continue
                message = replace(message, topic=self.config.default_topic)
            sendable.append((doc, message))
        if poison:
            self._marker.submit([], utcnow(), poison)
            self.stats.dead += len(poison)
        if sendable:
            handled.update(self._publish_with_retry(sendable, held))
        return handled

    def _publish_with_retry(
        self, sendable: list[tuple[Mapping[str, Any], Message]], held: set[str]
    ) -> Iterable[ObjectId]:
        handled: list[ObjectId] = []
        pending = sendable
        retrying = Retrying(
            retry=retry_if_exception_type(_Retry),
            # Exponential backoff plus jitter; the stop event cuts any wait short.
            wait=wait_exponential(
                multiplier=self.config.transient_initial, max=self.config.transient_max
            )
            + wait_random(0, self.config.transient_initial),
            stop=stop_when_event_set(self._stop),
            sleep=self._sleep,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.lease.check()
                    log.debug("publishing %d event(s)", len(pending))
                    results = self.publisher.publish([m for _, m in pending])
                    now = utcnow()
                    outcome = classify(
                        pending,
                        results,
                        now=now,
                        max_attempts=self.config.max_attempts,
                        retry_initial=self.config.retry_initial,
                        retry_max=self.config.retry_max,
                        hold_dead=self.config.dead_key_policy == "hold",
                        slot=message_slot,
                    )
                    self._marker.submit(outcome.published, now, outcome.failures)
                    handled.extend(outcome.published)
                    handled.extend(
                        f.event_id for f in outcome.failures if f.next_attempt_at is None
                    )
                    self.stats.published += len(outcome.published)
                    self.stats.failed += len(outcome.failures) - outcome.dead
                    self.stats.dead += outcome.dead
                    for failure in outcome.failures:
                        log.warning(
                            "event %s failed (attempt %d%s): %s",
                            failure.event_id,
                            failure.attempts,
                            ", now dead" if failure.next_attempt_at is None else "",
                            failure.error,
                        )
                    held.update(outcome.blocked)
                    self._blocked.update(outcome.blocked)
                    pending = outcome.retry
                    if pending:
                        first = next(
                            (e for e in results if isinstance(e, TransientPublishError)), None
                        )
                        log.warning(
                            "%d events failed transiently (%s); retrying", len(pending), first
                        )
                        raise _Retry
        except (_Retry, RetryError):
            # Stopping: the events left are still pending and the next start sweeps them.
            pass
        return handled

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _checkpoint(self, *, force: bool) -> None:
        token = self._token
        if token is None or token == self._saved_token:
            return
        now = time.monotonic()
        if not force and now - self._saved_at < self.config.checkpoint_interval:
            return
        self.lease.check()
        if not self.store.save_token(self.config.name, token, utcnow(), self.lease.fenced()):
            raise LeaseLostError(f"relay {self.config.name!r} lost its lease (checkpoint refused)")
        self._saved_token = token
        self._saved_at = now
