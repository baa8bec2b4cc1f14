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

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from bson import Timestamp
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from .._document import Event, Poison, event_from_raw
from .._errors import ConfigurationError, LeaseLostError
from .._mongo_errors import is_auth_failure, outbox_missing
from .._oplog import token_time
from .._partition import Partition
from .._store import OutboxStore
from ..publishers import Publisher
from ._backoff import Backoff
from ._budget import ByteBudget
from ._checkpoint import Checkpoint
from ._config import RelayConfig
from ._dedup import StreamSweepDedup
from ._dispatch import Dispatcher
from ._group import RelayGroup
from ._health import Health
from ._keeper import await_lease, await_outbox, keep_renewed, release_lease
from ._lease import Lease, new_owner_id
from ._metrics import PartitionState, RelayMetrics
from ._progress import Progress
from ._sampler import Sampler
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

    store: OutboxStore
    lease: Lease
    metrics: RelayMetrics
    _queue_budget: ByteBudget
    _sweep_turn: threading.Lock

    def __init__(self, client: MongoClient[Any], publisher: Publisher, config: RelayConfig) -> None:
        whole = Partition() if config.partitions == 1 else None
        self._setup(client, publisher, config, whole, None)

    @classmethod
    def _of_partition(cls, group: Relay, partition: Partition) -> Relay:
        """The relay of one partition, working for the group member ``group``.

        The member's memory is bounded by its settings, not by them times the partitions
        (which may all run at once): its partitions' queues share one byte budget, their sweeps
        take turns, and each publishes batches of a share of ``max_batch_bytes``.
        """
        config, parts = group.config, group.config.partitions
        share = dataclasses.replace(config, max_batch_bytes=max(1, config.max_batch_bytes // parts))
        relay = cls.__new__(cls)
        relay._setup(group.client, group.publisher, share, partition, group)
        return relay

    def _setup(
        self,
        client: MongoClient[Any],
        publisher: Publisher,
        config: RelayConfig,
        partition: Partition | None,
        group: Relay | None,
    ) -> None:
        self.client = client
        self.publisher = publisher
        self.config = config
        #: The slots this relay publishes; None for a group member, whose partitions' relays
        #: come and go with the group's membership.
        self.partition = partition
        self.store = (
            group.store if group else OutboxStore(client[config.database], config.collection)
        )
        self._stats = RelayStats()
        self._stop = threading.Event()
        owner = group.lease.owner if group else config.owner or new_owner_id()
        state_id = partition.state_id(config.name) if partition else config.name
        grouped = partition is not None and not partition.whole
        tags = (
            {"group": config.name, "partition": partition.index, "partitions": partition.count}
            if grouped and partition
            else None
        )
        self.lease = Lease(
            self.store.state,
            state_id,
            owner,
            config.lease_ttl,
            group=config.name if grouped else None,
            tags=tags,
        )
        self.checkpoint = Checkpoint(self.store, state_id, self.lease, config.checkpoint_interval)
        self.dedup = StreamSweepDedup()
        self.metrics = (
            group.metrics
            if group
            else RelayMetrics(
                f"{config.database}.{config.collection}",
                config.name,
                partitioned=config.partitions > 1,
                topics=[config.default_topic],
            )
        )
        self.health = Health(config.unhealthy_after)
        # Renewed every quarter of the ttl (keep_renewed): fresh while at most two renewals old.
        self.health.watch_lease(
            self.lease.since_renewal if partition else self._freshest_lease, config.lease_ttl / 2
        )
        self.dispatcher = Dispatcher(
            publisher,
            self.store,
            self.lease,
            config,
            self._stats,
            self.metrics,
            (group or self)._progressed,
        )
        #: What the partitions of a group member share (a relay has them to itself).
        self._queue_budget = group._queue_budget if group else ByteBudget(config.queue_bytes)
        self._sweep_turn = group._sweep_turn if group else threading.Lock()
        self.sweeper = Sweeper(
            self.store,
            self.dispatcher,
            config,
            self.store.cluster_time,
            partition or Partition(),
            self._sweep_turn,
        )
        self.sampler = Sampler(
            self.store, self._oldest_token, self.metrics, self.health, config.sample_interval
        )
        self.progress = Progress(config.progress_interval)
        self._group = group
        #: True while :meth:`run` works (or waits as a standby).
        self.running = False
        self._progress_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        #: Relays of the partitions this group member has worked on (None: not a member).
        self._partitions: list[Relay] | None = None if partition else []
        self._restarts = Backoff(config.transient_initial, config.transient_max)
        self._fence: int | None = None
        # A pipeline run is steady once it has consumed the stream without failing for this
        # long: only then are earlier failures over (for /healthz and the restart backoff).
        self._steady_after = min(10.0, config.unhealthy_after / 2)
        self._started_at = 0.0
        self._steady = False

    @property
    def stats(self) -> RelayStats:
        """Counters since start (a group member's add up those of its partitions)."""
        if self._partitions is None:
            return self._stats
        with self._stats_lock:
            return RelayStats.total([self._stats, *(r.stats for r in self._partitions)])

    def _enlist(self, partition: Partition) -> Relay:
        """A new relay for one of this group member's partitions."""
        relay = self._of_partition(self, partition)
        with self._stats_lock:
            assert self._partitions is not None
            self._partitions.append(relay)
        return relay

    def _retire(self, relay: Relay) -> None:
        """A partition's relay has ended: keep its counters, forget the relay."""
        with self._stats_lock:
            assert self._partitions is not None
            self._partitions.remove(relay)
            self._stats = RelayStats.total([self._stats, relay.stats])

    def run(self, stop: threading.Event | None = None) -> None:
        """Relay until ``stop`` is set; connection losses are ridden out with backoff.

        Waits as a standby while another relay holds the lease of this outbox and name. With
        ``partitions`` above 1 in its config, runs as a member of the group of relays sharing
        the name: it works on its share of the partitions, each in its own thread.
        """
        self._stop = stop or self._stop
        if self._partitions is not None:
            RelayGroup(self, self._enlist, self._retire).run(self._stop)
            return
        self.running = True
        failures = 0
        if self._group is None:
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
            if self._group is None:
                self.sampler.stop()
            release_lease(self.lease)
            self.running = False
        self.health.stopped("stopped")

    def run_once(self) -> int:
        """Publish everything pending and everything committed so far, then return.

        Returns the number of events published. Raises :class:`LeaseLostError` when another
        relay holds the lease for longer than one lease period (it is doing the work).
        """
        missing = outbox_missing(self.store.outbox)
        if missing is not None:
            raise ConfigurationError(missing)
        if self._partitions is not None:
            # A group member drains every partition in turn (each under its own lease).
            published = 0
            for i in range(self.config.partitions):
                relay = self._enlist(Partition(i, self.config.partitions))
                try:
                    published += relay.run_once()
                finally:
                    self._retire(relay)
            return published
        before = self.stats.published
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
        if is_auth_failure(exc):
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
            partition=self.partition or Partition(),
        )
        if recovered:
            self.stats.recoveries += 1
            self.checkpoint.forget()
        opened_at = stream.resume_token
        tailer = Tailer(
            stream,
            self._convert,
            max_bytes=config.queue_bytes,
            max_items=config.queue_size,
            budget=self._queue_budget,
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
        self._stats.skipped_duplicates = self.dedup.skipped
        self.checkpoint.save(force=True)

    def refresh_metrics(self) -> None:
        """Bring the gauges that need no query up to date (the HTTP side calls it)."""
        now = time.time()
        relays = [self] if self._partitions is None else self._working()
        self.metrics.partitions(
            PartitionState(
                None if r.partition is None or r.partition.whole else r.partition.index,
                None if r.checkpoint.saved_at is None else max(0.0, now - r.checkpoint.saved_at),
                r.lease.held,
                len(r.dispatcher.gate),
            )
            for r in relays
        )

    def _working(self) -> list[Relay]:
        """The partitions' relays of a group member that are running now."""
        with self._stats_lock:
            return [r for r in self._partitions or () if r.running]

    def _freshest_lease(self) -> float | None:
        """A group member's youngest partition lease renewal (None: it holds none)."""
        ages = [a for r in self._working() if (a := r.lease.since_renewal()) is not None]
        return min(ages, default=None)

    def _oldest_token(self) -> Mapping[str, Any] | None:
        """The checkpoint furthest behind (what the oplog must still hold)."""
        if self._partitions is None:
            return self.checkpoint.token
        tokens = [r.checkpoint.token for r in self._working() if r.checkpoint.token is not None]
        return min(tokens, key=lambda t: token_time(t) or Timestamp(0, 0), default=None)

    def _progressed(self) -> None:
        """The dispatcher settled events: a beat, and now and then a progress line."""
        self.health.beat()
        lags = [r.dispatcher.last_lag for r in (self._working() if self._partitions else [self])]
        lag = max((x for x in lags if x is not None), default=None)
        with self._progress_lock:  # a group member's partitions progress in several threads
            self.progress.update(self.stats.published, lag, self.sampler.pending)

    def _sweep(self, *, grace: float | None, at: Timestamp) -> SweepResult:
        result = self.sweeper.sweep(grace=grace, at=at, stop=self._stop)
        self.stats.sweep_resumes += result.resumed
        return result

    def _convert(self, raw: RawBSONDocument) -> Event | Poison:
        return event_from_raw(raw, self.config.default_topic, self.config.format)

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
        self._stats.skipped_duplicates = self.dedup.skipped
        self.checkpoint.advance(token)
        self.checkpoint.save()
        if failure is not None:
            raise _StreamError(f"change stream failed: {failure}") from failure
        return idle_at
