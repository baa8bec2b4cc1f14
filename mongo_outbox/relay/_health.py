"""Is the relay alive and getting somewhere? What ``/healthz`` and ``/readyz`` answer.

The rules, one clock each (the README says the same):

- ``/healthz`` fails once the relay has made no *progress* for ``unhealthy_after`` seconds.
  Progress is work MongoDB answered: a batch read from the change stream (an empty getMore
  counts: the stream answered), a sweep batch, events settled, a standby's answered lease poll,
  a group member's heartbeat. A pipeline failure suspends it: until a restarted run has stayed
  up for a while (:meth:`Health.working`), beats count for nothing, so a restart loop is not
  progress however busy it looks.
- ``/readyz`` answers ``active`` only while the lease is held and its last renewal is fresh
  (younger than two renewal intervals, half the lease's ttl), so it switches within one renewal
  interval of a missed renewal; ``standby`` while waiting for the lease; 503 with the reason
  otherwise.

Nothing here talks to MongoDB: a probe answers even while the server it watches does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Health"]


class Health:
    """Liveness and readiness of one relay, for the HTTP side; thread-safe."""

    def __init__(self, unhealthy_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.unhealthy_after = unhealthy_after
        self._clock = clock
        self._lock = threading.Lock()
        self._progress = clock()
        self._failing: str | None = None
        self._stopped: str | None = None
        self._role = "starting"
        self._not_ready: str | None = "not connected to MongoDB yet"
        self._problem: str | None = None
        self._since_renewal: Callable[[], float | None] = lambda: 0.0
        self._fresh_for = float("inf")

    def watch_lease(self, since_renewal: Callable[[], float | None], fresh_for: float) -> None:
        """Readiness follows the lease: ``since_renewal()`` gives the seconds since its last
        successful renewal (None: not held), fresh while at most ``fresh_for``."""
        with self._lock:
            self._since_renewal = since_renewal
            self._fresh_for = fresh_for

    def beat(self) -> None:
        """The loop got something done (counts unless the pipeline is failing)."""
        with self._lock:
            if self._failing is None:
                self._progress = self._clock()

    def working(self) -> None:
        """The pipeline runs in steady state: earlier failures are over, and that is progress."""
        with self._lock:
            self._progress = self._clock()
            self._failing = None

    def pipeline_failed(self, reason: str) -> None:
        """The pipeline failed and restarts: beats count for nothing until :meth:`working`."""
        with self._lock:
            self._failing = reason

    def stopped(self, reason: str) -> None:
        """The loop has ended for good (its thread is gone)."""
        with self._lock:
            self._stopped = reason

    def problem(self, reason: str | None) -> None:
        """A part of the relay (a group member's partition) is unhealthy; None: none is."""
        with self._lock:
            self._problem = reason

    def role(self, role: str) -> None:
        """``active``, ``standby`` or what the relay waits for."""
        with self._lock:
            self._role = role

    def readiness(self, problem: str | None) -> None:
        """What keeps the relay from being ready (None: MongoDB answers, the outbox exists)."""
        with self._lock:
            self._not_ready = problem

    def live(self) -> tuple[bool, str]:
        """(healthy, one-line reason)."""
        with self._lock:
            if self._stopped is not None:
                return False, f"relay loop stopped: {self._stopped}"
            if self._problem is not None:
                return False, self._problem
            silent = self._clock() - self._progress
            if silent <= self.unhealthy_after:
                return True, "ok"
            if self._failing is not None:
                return False, f"no progress for {silent:.0f}s, pipeline failing: {self._failing}"
            return False, f"relay loop made no progress for {silent:.0f}s"

    def ready(self) -> tuple[bool, str]:
        """(ready, ``active``/``standby`` or the reason it is not)."""
        with self._lock:
            if self._not_ready is not None:
                return False, self._not_ready
            if self._role == "standby":
                return True, "standby"
            if self._role != "active":
                return False, self._role
            since, fresh_for = self._since_renewal, self._fresh_for
        age = since()  # outside the lock: it reads the lease (or a group's partitions)
        if age is None:
            return False, "lease lost (not yet back to standby)"
        if age > fresh_for:
            return False, (
                f"lease last renewed {age:.1f}s ago (fresh for {fresh_for:g}s): "
                "MongoDB slow or unreachable"
            )
        return True, "active"
