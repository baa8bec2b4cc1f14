"""A relay group member: heartbeat, take a fair share of the partitions, give back extras.

Each tick the member renews its heartbeat, reads the live members and computes the same
assignment as every other member (:func:`~mongo_outbox.relay._membership.assign`). It starts a
partition's relay (a thread) for each partition it should own and asks the others to stop. A
started partition relay waits for the partition's lease like a standby, so it takes over only
after the previous owner finished its batch and released the lease, or after the lease
expired: no partition is ever published by two members at once, and each key's order holds
across the hand-over.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bson.errors import BSONError
from pymongo.errors import PyMongoError

from .._partition import Partition
from .._store import assign_missing_slots, ensure_slot_index
from ._keeper import await_outbox
from ._membership import Membership, assign

if TYPE_CHECKING:
    from ._runner import Relay

__all__ = ["RelayGroup"]

log = logging.getLogger("mongo_outbox.relay")


@dataclass
class _Worker:
    relay: Relay
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self, partition: Partition) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"outbox-partition-{partition.index}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        try:
            self.relay.run(self.stop)
        except BaseException as exc:  # raised again by the member's loop
            self.error = exc

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class RelayGroup:
    """Runs group member ``member`` until stopped; ``enlist`` makes a partition's relay and
    ``retire`` takes one that ended (its counters stay in the member's)."""

    def __init__(
        self,
        member: Relay,
        enlist: Callable[[Partition], Relay],
        retire: Callable[[Relay], None],
    ) -> None:
        config = member.config
        self._member = member
        self._enlist = enlist
        self._retire = retire
        self._count = config.partitions
        self.membership = Membership(
            member.store.state, config.name, member.lease.owner, self._count, config.lease_ttl
        )
        self._workers: dict[int, _Worker] = {}
        self.interval = min(1.0, config.lease_ttl / 4)

    def run(self, stop: threading.Event) -> None:
        """Work on this member's share of the partitions until ``stop`` is set."""
        member = self._member
        health = member.health
        member.sampler.start()
        try:
            if await_outbox(member.store, stop, health):
                self._prepare()
            while not stop.is_set() and await_outbox(member.store, stop, health):
                try:
                    self.tick()
                    health.working()
                except (PyMongoError, BSONError) as exc:
                    log.warning("relay group %r: heartbeat failed: %s", member.config.name, exc)
                    health.pipeline_failed(f"heartbeat failed: {exc}")
                stop.wait(self.interval)
        except BaseException as exc:
            health.stopped(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._stop_all()
            member.sampler.stop()
        health.stopped("stopped")

    def owned(self) -> list[int]:
        """Partitions whose lease this member holds now."""
        return sorted(p for p, w in self._workers.items() if w.relay.lease.held)

    def tick(self) -> None:
        """Heartbeat, then start and stop partition relays to match the assignment."""
        self._reap()
        members = self.membership.beat(self.owned())
        owner = self.membership.owner
        # A member that owns nothing yet waits while relays splitting the outbox another way
        # are live (a change of --partitions needs them all stopped first).
        blocked = not self._workers and bool(self.membership.blockers())
        wanted = set() if blocked else set(assign(members, self._count).get(owner, []))
        for index, worker in self._workers.items():
            if index not in wanted and not worker.stop.is_set():
                log.info(
                    "giving partition %d/%d back (%d members)", index, self._count, len(members)
                )
                worker.stop.set()  # it finishes its batch, checkpoints and releases the lease
        for index in sorted(wanted - self._workers.keys()):
            partition = Partition(index, self._count)
            worker = _Worker(self._enlist(partition))
            self._workers[index] = worker
            worker.start(partition)
        self._report()

    def _prepare(self) -> None:
        outbox = self._member.store.outbox
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
        """Forget partition relays that ended; raise what ended one with an error."""
        for index, worker in list(self._workers.items()):
            if worker.alive:
                continue
            del self._workers[index]
            self._retire(worker.relay)
            if worker.error is not None:
                raise worker.error

    def _report(self) -> None:
        health = self._member.health
        owned = self.owned()
        health.role("active" if owned else "standby")
        problems = []
        for index, worker in sorted(self._workers.items()):
            ok, reason = worker.relay.health.live()
            if not ok and not worker.stop.is_set():
                problems.append(f"partition {index}: {reason}")
        health.problem("; ".join(problems) or None)

    def _stop_all(self) -> None:
        for worker in self._workers.values():
            worker.stop.set()
        for worker in self._workers.values():
            if worker.thread is not None:
                worker.thread.join()
        self._workers.clear()
        try:
            self.membership.leave()
        except PyMongoError as exc:
            log.warning("could not remove this member's heartbeat (it expires): %s", exc)
