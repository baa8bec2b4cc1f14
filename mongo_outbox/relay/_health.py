"""Is the relay alive and getting somewhere? What ``/healthz`` and ``/readyz`` answer.

The loop *beats* whenever it gets something done: a batch from the change stream (an empty
getMore counts: the stream answered), a sweep batch, a poll as a standby. A relay blocked on a
server that does not answer, or whose publishing keeps failing, stops beating. Readiness comes
from the sampler, which talks to MongoDB off the hot path.
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
        self._beat = clock()
        self._failing_since: float | None = None
        self._failure = ""
        self._stopped: str | None = None
        self._role = "starting"
        self._not_ready: str | None = "not connected to MongoDB yet"
        self._problem: str | None = None

    def beat(self) -> None:
        """The loop got something done."""
        with self._lock:
            self._beat = self._clock()

    def working(self) -> None:
        """The pipeline runs in steady state: earlier failures are over."""
        with self._lock:
            self._beat = self._clock()
            self._failing_since = None

    def pipeline_failed(self, reason: str) -> None:
        """The pipeline failed and restarts (the first of a run of failures starts the clock)."""
        with self._lock:
            if self._failing_since is None:
                self._failing_since = self._clock()
            self._failure = reason

    def stopped(self, reason: str) -> None:
        """The loop has ended for good (its thread is gone)."""
        with self._lock:
            self._stopped = reason

    def problem(self, reason: str | None) -> None:
        """A part of the relay (a group member's partition) is unhealthy; None: none is."""
        with self._lock:
            self._problem = reason

    def role(self, role: str) -> None:
        """``active``, ``standby`` or ``waiting``."""
        with self._lock:
            self._role = role

    def readiness(self, problem: str | None) -> None:
        """What keeps the relay from being ready (None: MongoDB answers, the outbox exists)."""
        with self._lock:
            self._not_ready = problem

    def live(self) -> tuple[bool, str]:
        """(healthy, one-line reason)."""
        with self._lock:
            now = self._clock()
            if self._stopped is not None:
                return False, f"relay loop stopped: {self._stopped}"
            if self._problem is not None:
                return False, self._problem
            if self._failing_since is not None and now - self._failing_since > self.unhealthy_after:
                return False, (
                    f"pipeline failing for {now - self._failing_since:.0f}s: {self._failure}"
                )
            silent = now - self._beat
            if silent > self.unhealthy_after:
                return False, f"relay loop made no progress for {silent:.0f}s"
            return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """(ready, ``active``/``standby`` or the reason it is not)."""
        with self._lock:
            if self._not_ready is not None:
                return False, self._not_ready
            if self._role in ("active", "standby"):
                return True, self._role
            return False, self._role
