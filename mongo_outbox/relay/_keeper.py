"""Holding the lease: wait as a standby until it is ours, keep it renewed while working."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bson.errors import BSONError
from pymongo.errors import OperationFailure, PyMongoError

from .._mongo_errors import outbox_missing
from .._store import OutboxStore
from ._health import Health
from ._lease import Lease

__all__ = ["await_lease", "await_outbox", "keep_renewed", "release_lease"]

log = logging.getLogger("mongo_outbox.relay")


def await_outbox(store: OutboxStore, stop: threading.Event, health: Health) -> bool:
    """Wait, writing nothing, until the outbox collection exists; False if stopped first.

    A relay pointed at a mistyped database must not create it (nor its state collection).
    """
    announced = False
    while not stop.is_set():
        try:
            missing = outbox_missing(store.outbox)
            health.beat()  # MongoDB answered; a failed poll is no progress
        except PyMongoError as exc:
            missing = f"MongoDB does not answer: {type(exc).__name__}"
        health.readiness(missing)
        if missing is None:
            return True
        if not announced:
            log.warning("%s; waiting for it, writing nothing meanwhile", missing)
            health.role("waiting for the outbox collection")
            announced = True
        stop.wait(2.0)
    return False


def await_lease(
    lease: Lease, stop: threading.Event, timeout: float | None, health: Health | None = None
) -> bool:
    """Wait as a standby until ``lease`` is ours; False if stopped or timed out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    while not stop.is_set():
        try:
            acquired = lease.try_acquire()
            if health is not None:
                health.beat()  # MongoDB answered; a failed poll is no progress
                health.readiness(None)
            if acquired:
                if health is not None:
                    health.role("active")
                return True
        except OperationFailure:
            pass  # the lease has logged what the server said
        except BSONError as exc:
            log.warning("cannot read the relay state document: %s", exc)
        except PyMongoError as exc:
            log.warning("cannot reach MongoDB to take the lease: %s", exc)
            if health is not None:
                health.readiness(f"MongoDB does not answer: {type(exc).__name__}")
        if not announced:
            log.info("standby: another relay holds the lease of %r", lease.name)
            if health is not None:
                health.role("standby")
            announced = True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        stop.wait(min(1.0, lease.ttl / 4))
    return False


@contextmanager
def keep_renewed(lease: Lease) -> Iterator[None]:
    """Renew ``lease`` every quarter of its ttl from a thread while the block runs."""
    halt = threading.Event()

    def renew() -> None:
        while not halt.wait(lease.ttl / 4):
            try:
                if not lease.renew():
                    return
                lease.warn_other_relays()
            except (PyMongoError, BSONError) as exc:
                log.warning("lease renewal failed: %s", exc)

    thread = threading.Thread(target=renew, name="outbox-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        halt.set()
        thread.join()


def release_lease(lease: Lease) -> None:
    """Give the lease up (it expires by itself if MongoDB cannot be reached)."""
    try:
        lease.release()
    except PyMongoError as exc:
        log.warning("could not release the lease (it expires by itself): %s", exc)
