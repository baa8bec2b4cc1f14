"""Who may publish now: ordering slots held behind a failure, topics isolated while failing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from .._retry import Backoff

__all__ = ["KeyGate", "TopicBreaker"]


class KeyGate:
    """The ordering slots (topic and key) whose events must wait behind an earlier one.

    The change stream skips events of a held slot (they stay ``pending``); the sweep publishes
    them in order once the event in front is due. Rebuilt from the outbox at every sweep.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()

    def admits(self, slot: str | None) -> bool:
        """True when events of ``slot`` may be published now."""
        return slot is None or slot not in self._held

    def hold(self, slots: Iterable[str]) -> None:
        """Make ``slots`` wait."""
        self._held.update(slots)

    def replace(self, slots: Iterable[str]) -> None:
        """Hold exactly ``slots`` (what a sweep found waiting)."""
        self._held = set(slots)

    @property
    def held(self) -> frozenset[str]:
        """The slots held now."""
        return frozenset(self._held)

    def __len__(self) -> int:
        return len(self._held)


class TopicBreaker:
    """Isolates a topic that keeps failing transiently, so the other topics flow.

    A topic that has failed for ``isolate_after`` seconds without a success is isolated: its
    events stay ``pending`` (their keys held) until ``backoff`` says to try it again; another
    failure then isolates it again, for longer. A success closes the breaker.
    """

    def __init__(
        self,
        isolate_after: float,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._isolate_after = isolate_after
        self._backoff = backoff
        self._clock = clock
        self._failing_since: dict[str, float] = {}
        self._isolated_until: dict[str, float] = {}
        self._trips: dict[str, int] = {}

    def clear(self) -> bool:
        """True when no topic is (or was, without a success since) isolated: every topic
        is allowed."""
        return not self._isolated_until

    def allows(self, topic: str | None) -> bool:
        """True unless ``topic`` is isolated now."""
        until = self._isolated_until.get(topic or "")
        return until is None or self._clock() >= until

    def failed(self, topic: str | None) -> bool:
        """Record a transient failure; True when the topic is isolated as a result."""
        name = topic or ""
        now = self._clock()
        since = self._failing_since.setdefault(name, now)
        if name not in self._trips and now - since < self._isolate_after:
            return False
        trips = self._trips.get(name, 0) + 1
        self._trips[name] = trips
        self._isolated_until[name] = now + self._backoff.delay(trips)
        return True

    def succeeded(self, topic: str | None) -> None:
        """Close the breaker of ``topic``."""
        name = topic or ""
        self._failing_since.pop(name, None)
        self._isolated_until.pop(name, None)
        self._trips.pop(name, None)

    @property
    def isolated(self) -> list[str]:
        """Topics isolated now."""
        now = self._clock()
        return sorted(t for t, until in self._isolated_until.items() if now < until)
