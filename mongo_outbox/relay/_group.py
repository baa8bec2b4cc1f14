"""A relay group member: heartbeat, take a fair share of the partitions, give back extras.

Each tick the member renews its heartbeat, reads the live members and computes the same
assignment as every other member (:func:`~mongo_outbox.relay._membership.assign`). It starts a
:class:`~mongo_outbox.relay._worker.Worker` (a thread) for each partition it should own and asks
the others to stop. A started worker waits for the partition's lease like a standby, so it takes
over only after the previous owner finished its batch and released the lease, or after the
lease expired: no partition is ever published by two members at once, and each key's order
holds across the hand-over.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bson import Timestamp
from bson.errors import BSONError
from pymongo.errors import PyMongoError

from .._oplog import token_time
from .._partition import Partition
from .._store import assign_missing_slots, ensure_slot_index
from ._health import Health
from ._keeper import await_outbox
from ._membership import Membership, assign
from ._metrics import PartitionState
from ._shared import Shared
from ._stats import RelayStats
from ._worker import Worker

__all__ = ["GroupMember"]

log = logging.getLogger("mongo_outbox.relay")


@dataclass
class _Running:
    """A partition's worker in its thread."""

    worker: Worker
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"outbox-partition-{self.worker.partition.index}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop)
        except BaseException as exc:  # raised again by the member's loop
            self.error = exc

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class GroupMember:
    """A member of the group of relays sharing the config's name, each working on its share
    of ``partitions``; ``health`` tells how the member goes."""

    def __init__(self, shared: Shared, health: Health) -> None:
        config = shared.config
        self._count = config.partitions
        # Its partitions may all publish at once: each publishes batches of a share of
        # ``max_batch_bytes`` (their queues share one budget, their sweeps take turns).
        share = max(1, config.max_batch_bytes // self._count)
        self.shared = dataclasses.replace(
            shared, config=dataclasses.replace(config, max_batch_bytes=share)
        )
        self.health = health
        self.membership = Membership(
            shared.store.state, config.name, shared.owner, self._count, config.lease_ttl
        )
        self.interval = min(1.0, config.lease_ttl / 4)
        self._workers: dict[int, _Running] = {}
        #: The counters of the workers that ended.
        self._retired = RelayStats()
        self._lock = threading.Lock()

    @property
    def stats(self) -> RelayStats:
        """The counters of its workers, those that ended included."""
        with self._lock:
            return RelayStats.total(
                [self._retired, *(r.worker.stats for r in self._workers.values())]
            )

    def run(self, stop: threading.Event) -> None:
        """Work on this member's share of the partitions until ``stop`` is set."""
        store, health = self.shared.store, self.health
        try:
            if await_outbox(store, stop, health):
                self._prepare()
            while not stop.is_set() and await_outbox(store, stop, health):
                try:
                    self.tick()
                    health.working()
                except (PyMongoError, BSONError) as exc:
                    log.warning(
                        "relay group %r: heartbeat failed: %s", self.shared.config.name, exc
                    )
                    health.pipeline_failed(f"heartbeat failed: {exc}")
                stop.wait(self.interval)
        finally:
            self._stop_all()

    def run_once(self, stop: threading.Event) -> int:
        """Drain every partition in turn (each under its own lease); return the number published."""
        published = 0
        for index in range(self._count):
            worker = self._worker(index)
            try:
                published += worker.run_once(stop)
            finally:
                self._retire(worker)
        return published

    def states(self, now: float) -> list[PartitionState]:
        """What the per-partition gauges show: one row per partition worked on now."""
        return [w.state(now) for w in self._working()]

    def since_renewal(self) -> float | None:
        """The youngest renewal among the partition leases held (None: it holds none)."""
        ages = [a for w in self._working() if (a := w.since_renewal()) is not None]
        return min(ages, default=None)

    def oldest_token(self) -> Mapping[str, Any] | None:
        """The checkpoint furthest behind (what the oplog must still hold)."""
        tokens = [t for w in self._working() if (t := w.checkpoint.token) is not None]
        return min(tokens, key=lambda t: token_time(t) or Timestamp(0, 0), default=None)

    def last_lag(self) -> float | None:
        """The largest last lag of the partitions worked on now."""
        return max((x for w in self._working() if (x := w.last_lag()) is not None), default=None)

    def owned(self) -> list[int]:
        """Partitions whose lease this member holds now."""
        return sorted(p for p, r in self._workers.items() if r.worker.lease.held)

    def tick(self) -> None:
        """Heartbeat, then start and stop partition workers to match the assignment."""
        self._reap()
        members = self.membership.beat(self.owned())
        owner = self.membership.owner
        # A member that owns nothing yet waits while relays splitting the outbox another way
        # are live (a change of --partitions needs them all stopped first).
        blocked = not self._workers and bool(self.membership.blockers())
        wanted = set() if blocked else set(assign(members, self._count).get(owner, []))
        for index, running in self._workers.items():
            if index not in wanted and not running.stop.is_set():
                log.info(
                    "giving partition %d/%d back (%d members)", index, self._count, len(members)
                )
                running.stop.set()  # it finishes its batch, checkpoints and releases the lease
        for index in sorted(wanted - self._workers.keys()):
            running = _Running(self._worker(index))
            with self._lock:
                self._workers[index] = running
            running.start()
        self._report()

    def _worker(self, index: int) -> Worker:
        config = self.shared.config
        return Worker(self.shared, Partition(index, self._count), Health(config.unhealthy_after))

    def _retire(self, worker: Worker) -> None:
        """A worker has ended: forget it, keep its counters."""
        with self._lock:
            index = worker.partition.index
            if index in self._workers and self._workers[index].worker is worker:
                del self._workers[index]
            self._retired = RelayStats.total([self._retired, worker.stats])

    def _working(self) -> Iterator[Worker]:
        """The workers running now."""
        with self._lock:
            workers = [r.worker for r in self._workers.values()]
        return (w for w in workers if w.running)

    def _prepare(self) -> None:
        outbox = self.shared.store.outbox
        # Neither is needed for correctness: a failure here (no privilege, MongoDB gone for a
        # moment) is logged, and the partitions' pipelines ride out what follows.
        try:
            ensure_slot_index(outbox)
        except PyMongoError as exc:
            log.warning(
                "cannot create the index of the partitions' sweeps (%s): sweeps will scan; "
                "create it with `mongo-outbox init --partitions %d`",
                exc,
                self._count,
            )
        try:
            given = assign_missing_slots(outbox)
        except PyMongoError as exc:
            log.warning("cannot give slots to pending events written without one: %s", exc)
        else:
            if given:
                log.info(
                    "gave %d pending events written before slots existed their slot (so each "
                    "key is published by one partition)",
                    given,
                )
        try:
            self.membership.prune()
        except PyMongoError as exc:
            log.debug("could not prune old heartbeats: %s", exc)

    def _reap(self) -> None:
        """Forget the workers that ended (keeping their counters); raise what ended one with
        an error."""
        for running in list(self._workers.values()):
            if running.alive:
                continue
            self._retire(running.worker)
            if running.error is not None:
                raise running.error

    def _report(self) -> None:
        health = self.health
        owned = self.owned()
        health.role("active" if owned else "standby")
        problems = []
        for index, running in sorted(self._workers.items()):
            ok, reason = running.worker.health.live()
            if not ok and not running.stop.is_set():
                problems.append(f"partition {index}: {reason}")
        health.problem("; ".join(problems) or None)

    def _stop_all(self) -> None:
        for running in self._workers.values():
            running.stop.set()
        for running in list(self._workers.values()):
            if running.thread is not None:
                running.thread.join()
            self._retire(running.worker)
        try:
            self.membership.leave()
        except PyMongoError as exc:
            log.warning("could not remove this member's heartbeat (it expires): %s", exc)
