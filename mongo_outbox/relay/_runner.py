"""The relay loop: change stream plus sweeps, batch, publish, confirm, mark, checkpoint.

Start-up (and every restart of the pipeline after an error) is the same gap-free procedure:

1. open the change stream after the saved resume token, or, without a usable token, at the
   cluster time read just before;
2. read the cluster time T and sweep every ``pending`` event as of T (a snapshot read), in
   ``_id`` order, publishing them;
3. consume the stream, skipping changes at or before T (the sweep covered them).

Opening the stream before the sweep is what leaves no gap between the two. The jobs live in
their own objects: :class:`Checkpoint` (stream position), :class:`StreamSweepDedup` (what a
sweep already did), :class:`Dispatcher` (publish, retry, mark; it holds the key gate and the
topic breaker), :class:`Sweeper` and :class:`Tailer` (the two ways events come in).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from bson import Timestamp
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from .._errors import ConfigurationError, LeaseLostError
from .._store import OutboxStore
from ..publishers import Publisher
from ._backoff import Backoff
from ._checkpoint import Checkpoint
from ._config import RelayConfig
from ._decode import Event, Poison, event_from_raw
from ._dedup import StreamSweepDedup
from ._dispatch import Dispatcher
from ._health import Health
from ._keeper import await_lease, await_outbox, keep_renewed, release_lease
from ._lease import Lease, new_owner_id
from ._metrics import RelayMetrics
from ._progress import Progress
from ._sampler import Sampler, missing_outbox
from ._stats import RelayStats
from ._sweep import Sweeper, SweepResult
from ._tailer import Change, Idle, StreamFailed, Tailer, open_stream

__all__ = ["Relay", "RelayStats"]

log = logging.getLogger("mongo_outbox.relay")


class _StreamError(Exception):
    """The change stream failed while being read."""


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
        owner = config.owner or new_owner_id()
        self.lease = Lease(self.store.state, config.name, owner, config.lease_ttl)
        self.checkpoint = Checkpoint(
            self.store, config.name, self.lease, config.checkpoint_interval
        )
        self.dedup = StreamSweepDedup()
        self.metrics = RelayMetrics(f"{config.database}.{config.collection}", config.name)
        self.health = Health(config.unhealthy_after)
        self.dispatcher = Dispatcher(
            publisher, self.store, self.lease, config, self.stats, self.metrics, self._progressed
        )
        self.sweeper = Sweeper(self.store, self.dispatcher, config, self.store.cluster_time)
        self.sampler = Sampler(
            self.store, self.checkpoint, self.metrics, self.health, config.sample_interval
        )
        self.progress = Progress(config.progress_interval)
        self._restarts = Backoff(config.transient_initial, config.transient_max)
        self._fence: int | None = None
        # A pipeline run is steady once it has consumed the stream without failing for this
        # long: only then are earlier failures over (for /healthz and the restart backoff).
        self._steady_after = min(10.0, config.unhealthy_after / 2)
        self._started_at = 0.0
        self._steady = False

    def run(self, stop: threading.Event | None = None) -> None:
        """Relay until ``stop`` is set; connection losses are ridden out with backoff.

        Waits as a standby while another relay holds the lease of this outbox and name.
        """
        self._stop = stop or self._stop
        failures = 0
        self.sampler.start()
        try:
            # Checked before every (re)start: a dropped outbox must not be recreated by the
            # lease or the checkpoint.
            while (
                not self._stop.is_set()
                and await_outbox(self.store, self._stop, self.health)
                and self._take_lease(timeout=None)
            ):
                try:
                    with keep_renewed(self.lease):
                        self._pipeline(once=False)
                except LeaseLostError as exc:
                    log.warning("%s: stopped publishing; back to standby", exc)
                    self.dispatcher.gate.replace(())  # its holds are the new holder's now
                except (PyMongoError, BSONError, _StreamError) as exc:
                    # A run that reached a steady state was healthy: start the backoff afresh.
                    failures = 1 if self._steady else failures + 1
                    self._restart_after(exc, failures)
        except BaseException as exc:
            self.health.stopped(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.sampler.stop()
            release_lease(self.lease)
        self.health.stopped("stopped")

    def run_once(self) -> int:
        """Publish everything pending and everything committed so far, then return.

        Returns the number of events published. Raises :class:`LeaseLostError` when another
        relay holds the lease for longer than one lease period (it is doing the work).
        """
        before = self.stats.published
        missing = missing_outbox(self.store)
        if missing is not None:
            raise ConfigurationError(missing)
        try:
            if not self._take_lease(timeout=self.config.lease_ttl + 1.0):
                raise LeaseLostError(
                    f"another relay holds the lease of {self.config.name!r}: it is publishing"
                )
            with keep_renewed(self.lease):
                self._pipeline(once=True)
        finally:
            release_lease(self.lease)
        return self.stats.published - before

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch, checkpoint and return."""
        self._stop.set()

    def _take_lease(self, timeout: float | None) -> bool:
        if not await_lease(self.lease, self._stop, timeout, self.health):
            return False
        if self.lease.fence != self._fence:
            # Another relay may have moved on meanwhile: start from its checkpoint.
            self._fence = self.lease.fence
            self.checkpoint.invalidate()
            self.dispatcher.gate.replace(())
        return True

    def _restart_after(self, exc: BaseException, failures: int) -> None:
        if isinstance(exc, OperationFailure) and exc.code in (13, 18):
            raise ConfigurationError(f"MongoDB refused the relay: {exc}") from exc
        if isinstance(exc, _StreamError) and isinstance(exc.__cause__, OperationFailure):
            # The server refused to go on from our position (history lost, invalid token...).
            # Recovery from the cluster time is always safe.
            self.checkpoint.forget()
        self.stats.restarts += 1
        self.metrics.restarts.inc()
        self.health.pipeline_failed(str(exc))
        delay = self._restarts.delay(failures)
        log.warning("relay pipeline failed (%s); restarting in %.1fs", exc, delay)
        self._stop.wait(delay)

    # -- the loop ------------------------------------------------------------------------

    def _pipeline(self, *, once: bool) -> None:
        config, stop = self.config, self._stop
        token = self.checkpoint.load()
        await_seconds = min(config.max_await_seconds, 0.1) if once else config.max_await_seconds
        stream, recovered = open_stream(
            self.store,
            token,
            self.store.cluster_time,
            await_seconds=await_seconds,
            batch_size=config.batch_size,
        )
        if recovered:
            self.stats.recoveries += 1
            self.checkpoint.forget()
        opened_at = stream.resume_token
        tailer = Tailer(
            stream, self._convert, max_bytes=config.queue_bytes, max_items=config.queue_size
        )
        tailer.start()
        self.dispatcher.start(stop)
        self._started_at, self._steady = time.monotonic(), False
        try:
            # 2. sweep everything pending as of T; the stream skips what it covered.
            at = self.store.cluster_time()
            self.dedup.covered(at)
            self._sweep(grace=None, at=at)
            if self.checkpoint.token is None:
                # The sweep covered everything committed before the stream opened, so its
                # opening position is already a safe checkpoint.
                self.checkpoint.advance(opened_at)
                self.checkpoint.save(force=True)
            # 3. consume the stream; sweep for stragglers and due retries now and then.
            started = time.monotonic()
            next_sweep = started + config.sweep_interval
            while not stop.is_set():
                idle_at = self._consume(tailer)
                if once and idle_at is not None and idle_at > started:
                    break
                if time.monotonic() >= next_sweep:
                    # Marks still in flight would make published events look pending.
                    self.dispatcher.flush()
                    at = self.store.cluster_time()
                    swept = self._sweep(grace=config.sweep_grace, at=at)
                    self.dedup.swept(swept.handled, swept.read_at or at, swept.done)
                    next_sweep = time.monotonic() + config.sweep_interval
            self.dispatcher.flush()
        finally:
            tailer.stop()
            self.dispatcher.close()
        self.stats.skipped_duplicates = self.dedup.skipped
        self.checkpoint.save(force=True)

    def refresh_metrics(self) -> None:
        """Bring the gauges that need no query up to date (the HTTP side calls it)."""
        saved = self.checkpoint.saved_at
        self.metrics.checkpoint(None if saved is None else max(0.0, time.time() - saved))
        self.metrics.held_keys.set(len(self.dispatcher.gate))
        self.metrics.lease_active.set(1 if self.lease.held else 0)

    def _progressed(self) -> None:
        """The dispatcher settled events: a beat, and now and then a progress line."""
        self.health.beat()
        self.progress.update(self.stats.published, self.dispatcher.last_lag, self.sampler.pending)

    def _sweep(self, *, grace: float | None, at: Timestamp) -> SweepResult:
        result = self.sweeper.sweep(grace=grace, at=at, stop=self._stop)
        self.stats.sweep_resumes += result.resumed
        return result

    def _convert(self, raw: RawBSONDocument) -> Event | Poison:
        return event_from_raw(raw, self.config.default_topic)

    def _consume(self, tailer: Tailer) -> float | None:
        """Take one batch from the stream and publish it; return the time of an idle mark."""
        self.dispatcher.check()
        items = tailer.queue.take(self.config.batch_size, self.config.max_batch_bytes, 0.2)
        if any(not isinstance(item, StreamFailed) for item in items):
            self.health.beat()  # the stream answers
            if not self._steady and time.monotonic() - self._started_at >= self._steady_after:
                self._steady = True
                self.health.working()
        records: list[Event | Poison] = []
        idle_at: float | None = None
        failure: BaseException | None = None
        token = None
        for item in items:
            if isinstance(item, StreamFailed):
                failure = item.error
                break
            token = item.token
            if isinstance(item, Idle):
                idle_at = item.at
                self.dedup.idle(item.at)
            elif isinstance(item, Change) and not self.dedup.skip(item.event_id, item.cluster_time):
                records.append(item.record)
        if records:
            self.dispatcher.dispatch(records)
        self.stats.skipped_duplicates = self.dedup.skipped
        self.checkpoint.advance(token)
        self.checkpoint.save()
        if failure is not None:
            raise _StreamError(f"change stream failed: {failure}") from failure
        return idle_at
