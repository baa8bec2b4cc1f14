"""The relay: moves committed outbox events to a publisher.

:class:`Relay` builds what its workers share (store, publisher, settings, metrics, health, the
lease owner's id), samples the outbox off the hot path, and runs either one
:class:`~mongo_outbox.relay._worker.Worker` for the whole outbox or, with ``partitions`` above 1,
a :class:`~mongo_outbox.relay._group.GroupMember` that runs a worker per partition it owns. A
worker runs :class:`~mongo_outbox.relay._pipeline.Pipeline` after :class:`Pipeline` while it
holds its lease.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pymongo import MongoClient

from .._errors import ConfigurationError
from .._mongo_errors import outbox_missing
from .._partition import Partition
from .._store import OutboxStore
from ..publishers import Publisher
from ._budget import ByteBudget
from ._config import RelayConfig
from ._group import GroupMember
from ._health import Health
from ._lease import new_owner_id
from ._metrics import RelayMetrics
from ._progress import Progress
from ._publishing import timed
from ._sampler import Sampler
from ._shared import Shared
from ._stats import RelayStats
from ._worker import Worker

__all__ = ["Relay", "RelayStats"]


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
        self.metrics = RelayMetrics(
            f"{config.database}.{config.collection}",
            config.name,
            partitioned=config.partitions > 1,
            topics=[config.default_topic],
        )
        self.health = Health(config.unhealthy_after)
        self.progress = Progress(config.progress_interval)
        self._progress_lock = threading.Lock()
        self._stop = threading.Event()
        shared = Shared(
            self.store,
            timed(publisher, self.metrics.publish_duration.observe),
            config,
            self.metrics,
            config.owner or new_owner_id(),
            ByteBudget(config.queue_bytes),
            threading.Lock(),
            self._progressed,
        )
        self._role: Worker | GroupMember = (
            GroupMember(shared, self.health)
            if config.partitions > 1
            else Worker(shared, Partition(), self.health)
        )
        # Renewed every quarter of the ttl (keep_renewed): fresh while at most two renewals old.
        self.health.watch_lease(self._role.since_renewal, config.lease_ttl / 2)
        self.sampler = Sampler(
            self.store, self._role.oldest_token, self.metrics, self.health, config.sample_interval
        )

    @property
    def stats(self) -> RelayStats:
        """Counters since start (a group member's add up those of its partitions)."""
        return self._role.stats

    def run(self, stop: threading.Event | None = None) -> None:
        """Relay until ``stop`` is set; connection losses are ridden out with backoff.

        Waits as a standby while another relay holds the lease of this outbox and name. With
        ``partitions`` above 1 in its config, runs as a member of the group of relays sharing
        the name: it works on its share of the partitions, each in its own thread.
        """
        self._stop = stop or self._stop
        self.sampler.start()
        try:
            self._role.run(self._stop)
        except BaseException as exc:
            self.health.stopped(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.sampler.stop()
        self.health.stopped("stopped")

    def run_once(self) -> int:
        """Publish everything pending and everything committed so far, then return.

        Returns the number of events published. Raises :class:`LeaseLostError` when another
        relay holds the lease for longer than one lease period (it is doing the work).
        """
        missing = outbox_missing(self.store.outbox)
        if missing is not None:
            raise ConfigurationError(missing)
        return self._role.run_once(self._stop)

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch, checkpoint and return."""
        self._stop.set()

    def refresh_metrics(self) -> None:
        """Bring the gauges that need no query up to date (the HTTP side calls it)."""
        self.metrics.partitions(self._role.states(time.time()))

    def _progressed(self) -> None:
        """A dispatcher settled events: a beat, and now and then a progress line."""
        self.health.beat()
        with self._progress_lock:  # a group member's partitions progress in several threads
            self.progress.update(self.stats.published, self._role.last_lag(), self.sampler.pending)
