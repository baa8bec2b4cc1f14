"""A worker: relays one partition (or the whole outbox) while it holds its lease.

It waits as a standby until the lease is its own, keeps the lease renewed while a
:class:`~mongo_outbox.relay._pipeline.Pipeline` runs, and starts a new run with backoff after an
error. Its parts (checkpoint, dispatcher, sweeper) outlast the runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from bson.errors import BSONError
from pymongo.errors import OperationFailure, PyMongoError

from .._errors import ConfigurationError, LeaseLostError
from .._mongo_errors import is_auth_failure
from .._partition import Partition
from .._retry import Backoff
from ._checkpoint import Checkpoint
from ._dedup import StreamSweepDedup
from ._dispatch import Dispatcher
from ._health import Health
from ._keeper import await_lease, await_outbox, keep_renewed, release_lease
from ._lease import Lease
from ._metrics import PartitionState
from ._pipeline import Pipeline, StreamError
from ._publishing import FencedPublisher
from ._shared import Shared
from ._stats import RelayStats
from ._sweep import Sweeper

__all__ = ["Worker"]

log = logging.getLogger("mongo_outbox.relay")


class Worker:
    """Relays ``partition`` of the outbox; ``health`` tells how it goes."""

    def __init__(self, shared: Shared, partition: Partition, health: Health) -> None:
        config = shared.config
        self._shared = shared
        self.partition = partition
        self.health = health
        self.stats = RelayStats()
        state_id = partition.state_id(config.name)
        grouped = not partition.whole
        self.lease = Lease(
            shared.store.state,
            state_id,
            shared.owner,
            config.lease_ttl,
            group=config.name if grouped else None,
            tags=(
                {"group": config.name, "partition": partition.index, "partitions": partition.count}
                if grouped
                else None
            ),
        )
        self.checkpoint = Checkpoint(shared.store, state_id, self.lease, config.checkpoint_interval)
        self.dedup = StreamSweepDedup()
        self.dispatcher = Dispatcher(
            FencedPublisher(shared.publisher, self.lease),
            shared.store,
            config,
            self.stats,
            shared.metrics,
            shared.on_progress,
        )
        self.sweeper = Sweeper(
            shared.store,
            self.dispatcher,
            config,
            shared.store.cluster_time,
            partition,
            shared.sweep_turn,
        )
        #: True while :meth:`run` works (or waits as a standby).
        self.running = False
        self._restarts = Backoff(config.transient_initial, config.transient_max)
        self._fence: int | None = None

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, as a standby while another relay holds the lease."""
        self.running = True
        failures = 0
        try:
            # Checked before every (re)start: a dropped outbox must not be recreated by the
            # lease or the checkpoint.
            while (
                not stop.is_set()
                and await_outbox(self._shared.store, stop, self.health)
                and self._take_lease(stop, timeout=None)
            ):
                pipeline = self._pipeline(stop, once=False)
                try:
                    with keep_renewed(self.lease):
                        pipeline.run()
                except LeaseLostError as exc:
                    log.warning("%s: stopped publishing; back to standby", exc)
                    self.dispatcher.release_holds()  # its holds are the new holder's now
                except (PyMongoError, BSONError, StreamError) as exc:
                    # A run that reached a steady state was healthy: start the backoff afresh.
                    failures = 1 if pipeline.steady else failures + 1
                    self._restart_after(exc, failures, stop)
        finally:
            release_lease(self.lease)
            self.running = False

    def run_once(self, stop: threading.Event) -> int:
        """Publish what is pending and committed so far; return the number published."""
        before = self.stats.published
        try:
            if not self._take_lease(stop, timeout=self._shared.config.lease_ttl + 1.0):
                raise LeaseLostError(
                    f"another relay holds the lease of {self._shared.config.name!r}: "
                    "it is publishing"
                )
            with keep_renewed(self.lease):
                self._pipeline(stop, once=True).run()
        finally:
            release_lease(self.lease)
        return self.stats.published - before

    def states(self, now: float) -> list[PartitionState]:
        """What the per-partition gauges show: this worker's one row."""
        return [self.state(now)]

    def state(self, now: float) -> PartitionState:
        """What the per-partition gauges show of this worker."""
        saved_at = self.checkpoint.saved_at
        return PartitionState(
            None if self.partition.whole else self.partition.index,
            None if saved_at is None else max(0.0, now - saved_at),
            self.lease.held,
            self.dispatcher.held_count,
        )

    def since_renewal(self) -> float | None:
        """Seconds since the lease was last renewed (None: not held)."""
        return self.lease.since_renewal()

    def oldest_token(self) -> Mapping[str, Any] | None:
        """The checkpoint (what the oplog must still hold)."""
        return self.checkpoint.token

    def last_lag(self) -> float | None:
        """created_at to confirmation of the last event published (seconds)."""
        return self.dispatcher.last_lag

    def _pipeline(self, stop: threading.Event, *, once: bool) -> Pipeline:
        return Pipeline(
            self._shared,
            self.partition,
            self.checkpoint,
            self.dedup,
            self.dispatcher,
            self.sweeper,
            self.stats,
            self.health,
            stop,
            once=once,
        )

    def _take_lease(self, stop: threading.Event, timeout: float | None) -> bool:
        if not await_lease(self.lease, stop, timeout, self.health):
            return False
        if self.lease.fence != self._fence:
            # Another relay may have moved on meanwhile: start from its checkpoint.
            self._fence = self.lease.fence
            self.checkpoint.invalidate()
            self.dispatcher.release_holds()
        return True

    def _restart_after(self, exc: BaseException, failures: int, stop: threading.Event) -> None:
        if is_auth_failure(exc):
            raise ConfigurationError(f"MongoDB refused the relay: {exc}") from exc
        if isinstance(exc, StreamError) and isinstance(exc.__cause__, OperationFailure):
            # The server refused to go on from our position (history lost, invalid token...).
            # Recovery from the cluster time is always safe.
            self.checkpoint.forget()
        self.stats.restarts += 1
        self._shared.metrics.restarts.inc()
        self.health.pipeline_failed(str(exc))
        delay = self._restarts.delay(failures)
        log.warning("relay pipeline failed (%s); restarting in %.1fs", exc, delay)
        stop.wait(delay)
