"""A progress line while the relay publishes: at most one per interval, none while idle."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Progress"]

log = logging.getLogger("mongo_outbox.relay")


class Progress:
    """Logs events published, rate, last lag and pending, at most every ``interval`` seconds."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._since = clock()
        self._count = 0

    def update(self, published: int, lag: float | None, pending: int | None) -> str | None:
        """Given the total published so far, log (and return) a line when one is due."""
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self.interval:
            return None
        done = published - self._count
        self._since, self._count = now, published
        if done <= 0:
            return None  # quiet when idle
        line = (
            f"published {done} events in {elapsed:.0f}s ({done / elapsed:.0f}/s), "
            f"lag {'-' if lag is None else f'{lag:.2f}s'}, "
            f"pending {'-' if pending is None else pending}"
        )
        log.info("%s", line)
        return line
