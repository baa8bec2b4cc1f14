"""One run of the relay: open the change stream, sweep, consume, flush. Read this page first.

Every run (the first, and each restart after an error) is the same gap-free procedure:

1. open the change stream after the saved resume token, or, without a usable token, at the
   cluster time read just before;
2. read the cluster time T and sweep every ``pending`` event as of T (a snapshot read), in
   ``_id`` order, publishing them;
3. consume the stream, skipping changes at or before T (the sweep covered them), and sweep
   now and then for stragglers and due retries.

Opening the stream before the sweep is what leaves no gap between the two. The parts live in
their own objects and outlast a run: :class:`Checkpoint` (stream position),
:class:`StreamSweepDedup` (what a sweep already did), :class:`Dispatcher` (publish, retry, mark;
it holds the key gate and the topic breaker), :class:`Sweeper` and :class:`Tailer` (the two ways
events come in). A :class:`~mongo_outbox.relay._worker.Worker` holds them and starts a run.
"""

from __future__ import annotations

import threading
import time

from bson import Timestamp
from bson.raw_bson import RawBSONDocument

from .._document import Event, Poison, event_from_raw
from .._partition import Partition
from ._checkpoint import Checkpoint
from ._dedup import StreamSweepDedup
from ._dispatch import Dispatcher
from ._health import Health
from ._shared import Shared
from ._stats import RelayStats
from ._sweep import Sweeper, SweepResult
from ._tailer import Change, Idle, StreamFailed, Tailer, open_stream

__all__ = ["Pipeline", "StreamError"]


class StreamError(Exception):
    """The change stream failed while being read."""


class Pipeline:
    """One run over ``partition`` until ``stop`` is set (or, ``once``, until caught up)."""

    def __init__(
        self,
        shared: Shared,
        partition: Partition,
        checkpoint: Checkpoint,
        dedup: StreamSweepDedup,
        dispatcher: Dispatcher,
        sweeper: Sweeper,
        stats: RelayStats,
        health: Health,
        stop: threading.Event,
        *,
        once: bool,
    ) -> None:
        self._shared = shared
        self._config = shared.config
        self._store = shared.store
        self._partition = partition
        self._checkpoint = checkpoint
        self._dedup = dedup
        self._dispatcher = dispatcher
        self._sweeper = sweeper
        self._stats = stats
        self._health = health
        self._stop = stop
        self._once = once
        # A run is steady once it has consumed the stream without failing for this long: only
        # then are earlier failures over (for /healthz and the worker's restart backoff).
        self._steady_after = min(10.0, self._config.unhealthy_after / 2)
        self._started_at = 0.0
        #: True once this run consumed the stream for a while without failing.
        self.steady = False

    def run(self) -> None:
        """Run the procedure above; raises what stops it early (the worker restarts it)."""
        config, stop, checkpoint = self._config, self._stop, self._checkpoint
        # 1. open the stream after the checkpoint (or at the cluster time, recovering).
        await_seconds = config.max_await_seconds
        if self._once:
            await_seconds = min(await_seconds, 0.1)
        stream, recovered = open_stream(
            self._store,
            checkpoint.load(),
            self._store.cluster_time,
            await_seconds=await_seconds,
            batch_size=config.batch_size,
            partition=self._partition,
        )
        if recovered:
            self._stats.recoveries += 1
            checkpoint.forget()
        opened_at = stream.resume_token
        tailer = Tailer(
            stream,
            self._convert,
            max_bytes=config.queue_bytes,
            max_items=config.queue_size,
            budget=self._shared.queue_budget,
        )
        tailer.start()
        self._dispatcher.start(stop)
        self._started_at = time.monotonic()
        try:
            # 2. sweep everything pending as of T; the stream skips what it covered.
            at = self._store.cluster_time()
            self._dedup.covered(at)
            self._sweep(grace=None, at=at)
            if checkpoint.token is None:
                # The sweep covered everything committed before the stream opened, so its
                # opening position is already a safe checkpoint.
                checkpoint.advance(opened_at)
                checkpoint.save(force=True)
            # 3. consume the stream; sweep for stragglers and due retries now and then.
            started = time.monotonic()
            next_sweep = started + config.sweep_interval
            while not stop.is_set():
                idle_at = self._consume(tailer)
                if self._once and idle_at is not None and idle_at > started:
                    break
                if time.monotonic() >= next_sweep:
                    # Marks still in flight would make published events look pending.
                    self._dispatcher.flush()
                    at = self._store.cluster_time()
                    swept = self._sweep(grace=config.sweep_grace, at=at)
                    self._dedup.swept(swept.handled, swept.read_at or at, swept.done)
                    next_sweep = time.monotonic() + config.sweep_interval
            # 4. flush: every outcome written before the position that follows it.
            self._dispatcher.flush()
        finally:
            tailer.stop()
            self._dispatcher.close()
        self._stats.skipped_duplicates = self._dedup.skipped
        checkpoint.save(force=True)

    def _consume(self, tailer: Tailer) -> float | None:
        """Take one batch from the stream and publish it; return the time of an idle mark."""
        config = self._config
        self._dispatcher.check()
        items = tailer.queue.take(config.batch_size, config.max_batch_bytes, 0.2)
        if any(not isinstance(item, StreamFailed) for item in items):
            self._health.beat()  # the stream answers
            if not self.steady and time.monotonic() - self._started_at >= self._steady_after:
                self.steady = True
                self._health.working()
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
                self._dedup.idle(item.at)
            elif isinstance(item, Change) and not self._dedup.skip(
                item.event_id, item.cluster_time
            ):
                records.append(item.record)
        if records:
            self._dispatcher.dispatch(records)
        self._stats.skipped_duplicates = self._dedup.skipped
        self._checkpoint.advance(token)
        self._checkpoint.save()
        if failure is not None:
            raise StreamError(f"change stream failed: {failure}") from failure
        return idle_at

    def _sweep(self, *, grace: float | None, at: Timestamp) -> SweepResult:
        result = self._sweeper.sweep(grace=grace, at=at, stop=self._stop)
        self._stats.sweep_resumes += result.resumed
        return result

    def _convert(self, raw: RawBSONDocument) -> Event | Poison:
        return event_from_raw(raw, self._config.default_topic, self._config.format)
