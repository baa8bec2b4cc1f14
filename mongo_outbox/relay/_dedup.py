"""Stream against sweep: skip the changes a sweep has already published.

Two rules. The start-up sweep reads a snapshot at cluster time T after the stream opened, so
every change at or before T is covered and skipped. A periodic sweep publishes ids that the
(possibly lagging) stream may still deliver: those ids are skipped until the stream passes
the time the sweep read at.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bson import Timestamp

__all__ = ["StreamSweepDedup"]


class StreamSweepDedup:
    """Decides which stream changes a sweep already handled."""

    def __init__(self) -> None:
        self._covered_until: Timestamp | None = None
        self._swept: set[Any] = set()
        self._swept_at: Timestamp | None = None
        self._swept_done = 0.0
        #: Changes skipped so far.
        self.skipped = 0

    def covered(self, until: Timestamp) -> None:
        """Every change at or before ``until`` was covered by the start-up sweep."""
        self._covered_until = until
        self._swept.clear()
        self._swept_at = None

    def swept(self, ids: Iterable[Any], at: Timestamp, done: float) -> None:
        """A periodic sweep read at ``at`` handled ``ids``; it ended at monotonic ``done``."""
        # Accumulated, not replaced: a lagging stream may not have reached earlier sweeps' ids.
        self._swept.update(ids)
        self._swept_at = at
        self._swept_done = done

    def idle(self, at: float) -> None:
        """The stream was idle at monotonic ``at``: it has passed every earlier sweep."""
        if at > self._swept_done:
            self._swept.clear()

    def skip(self, event_id: Any, cluster_time: Any) -> bool:
        """True when the change of ``event_id`` committed at ``cluster_time`` was handled."""
        ct = cluster_time if isinstance(cluster_time, Timestamp) else None
        if self._covered_until is not None and ct is not None:
            if ct <= self._covered_until:
                self.skipped += 1
                return True
            self._covered_until = None
        if self._swept:
            if self._swept_at is not None and ct is not None and ct > self._swept_at:
                self._swept.clear()
            elif event_id in self._swept:
                self.skipped += 1
                return True
        return False
