"""Pure decisions of the relay: which events may go now, and what a publish result means.

Per-key order is the rule: an event whose key has an earlier event still waiting (failed and
not yet due, or held) waits too. Events without a key never wait for anything.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._document import Event, key_of
from .._errors import PublishError, TransientPublishError
from .._message import message_lane
from .._retry import Backoff
from .._store import Failure
from .._times import as_utc

__all__ = ["Outcome", "SweepFilter", "classify"]


class SweepFilter:
    """Admits pending events, read in ``_id`` order, that may be published now.

    ``grace`` None admits every due event (start-up and ``--once``); otherwise events younger
    than ``grace`` seconds with no failed attempt are left to the change stream, unless their
    key is in ``blocked`` (the stream has held those back, so the sweep must take them). Keys that
    hold an event back are remembered in :attr:`held`; :attr:`waiting` keeps those held by an
    event that is not due yet (the ones the change stream must hold too).
    """

    def __init__(
        self,
        now: _dt.datetime,
        grace: float | None,
        blocked: Iterable[str] = (),
        dead_keys: Iterable[str] = (),
        lane: Callable[[Mapping[str, Any]], str | None] = key_of,
    ) -> None:
        self._lane = lane
        self.now = now
        self.blocked = frozenset(blocked)
        self.young_after = None if grace is None else now - _dt.timedelta(seconds=grace)
        # Keys of dead events hold everything after them (the "hold" dead-key policy).
        self.held: set[str] = set(dead_keys)
        self.waiting: set[str] = set(dead_keys)

    def admit(self, doc: Mapping[str, Any]) -> bool:
        """True when ``doc`` may be published now."""
        # The lane is worked out only when it matters: a sweep with nothing held needs none
        # for the events it admits.
        held = self.held
        if held:
            key = self._lane(doc)
            if key is not None and key in held:
                return False
        next_at = doc.get("next_attempt_at")
        if isinstance(next_at, _dt.datetime) and as_utc(next_at) > self.now:
            self._hold(self._lane(doc), waiting=True)
            return False
        if self.young_after is not None and next_at is None:
            created = doc.get("created_at")
            if isinstance(created, _dt.datetime) and as_utc(created) > self.young_after:
                key = self._lane(doc)
                if key not in self.blocked:
                    self._hold(key, waiting=False)
                    return False
        return True

    def _hold(self, key: str | None, *, waiting: bool) -> None:
        if key is not None:
            self.held.add(key)
            if waiting:
                self.waiting.add(key)


@dataclass
class Outcome:
    """What to record after a publish: published ids, failures, retries, blocked lanes."""

    published: list[Any] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    retry: list[Event] = field(default_factory=list)
    blocked: set[str] = field(default_factory=set)
    succeeded_topics: set[str | None] = field(default_factory=set)
    dead: int = 0


def classify(
    sent: Sequence[Event],
    results: Sequence[PublishError | None],
    *,
    now: _dt.datetime,
    max_attempts: int,
    retry: Backoff,
    hold_dead: bool = False,
) -> Outcome:
    """Decide each event's fate from its publish result, keeping per-lane order.

    A transient error sends the event, and every later event of its lane, back for an
    in-process retry without counting an attempt. A permanent error counts an attempt and
    schedules the next one after ``retry``'s delay (or makes the event dead at
    ``max_attempts``); later events of its lane stay pending, and the lane is reported blocked.
    A dead event blocks its lane only with ``hold_dead``.
    """
    outcome = Outcome()
    if len(sent) == len(results) and results.count(None) == len(results):
        # The common case, everything published: nothing blocks or retries a lane.
        outcome.published = [e.message.event_id for e in sent]
        outcome.succeeded_topics = {e.message.topic for e in sent}
        return outcome
    retrying: set[str] = set()
    for event, error in zip(sent, results, strict=True):
        message = event.message
        key = message_lane(message)
        if key is not None and key in outcome.blocked:
            continue  # stays pending behind the failed event
        if key is not None and key in retrying:
            outcome.retry.append(event)
            continue
        if error is None:
            outcome.published.append(message.event_id)
            outcome.succeeded_topics.add(message.topic)
        elif isinstance(error, TransientPublishError):
            outcome.retry.append(event)
            if key is not None:
                retrying.add(key)
        else:
            attempts = event.attempts + 1
            if attempts >= max_attempts:
                outcome.failures.append(Failure(message.event_id, attempts, str(error), None))
                outcome.dead += 1
                if hold_dead and key is not None:
                    outcome.blocked.add(key)
            else:
                next_at = now + _dt.timedelta(seconds=retry.delay(attempts))
                outcome.failures.append(Failure(message.event_id, attempts, str(error), next_at))
                if key is not None:
                    outcome.blocked.add(key)
    return outcome
