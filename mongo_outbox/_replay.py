"""Replay: publish already-published events again, for a consumer that lost its data.

Replay reads the outbox and never writes to it: the events' status and bookkeeping stay as
they are. Events go out in ``_id`` order (so in order per key), marked ``outbox_replay=1``,
through the same :class:`~mongo_outbox.Publisher` and message format as the relay.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo.collection import Collection

from ._document import STATUS_PUBLISHED, Poison, decode_document
from ._errors import ConfigurationError, PoisonEventError, PublishError, TransientPublishError
from ._formats import MessageFormat
from ._limits import check_topic
from ._message import Message, message_from_document
from ._retention import parse_duration
from ._store import RAW, raw_batches
from .publishers import Publisher

__all__ = ["Replay", "ReplayResult", "ReplaySelection", "parse_time"]

# Events read and published together (at most; and at most 16 MiB of them).
_BATCH = 500
# A batch that keeps failing transiently is retried with backoff for this long, then given up.
_RETRY_FOR = 120.0


def parse_time(text: str, now: _dt.datetime | None = None) -> _dt.datetime:
    """An ISO 8601 time (UTC unless it says otherwise) or a duration before ``now`` (``2h``)."""
    text = text.strip()
    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            return (now or _dt.datetime.now(_dt.timezone.utc)) - _dt.timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{text!r} reaches before the year 1") from None
    try:
        iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
        value = _dt.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (2026-11-28T09:00:00Z) nor a duration "
            "before now (90m, 2h, 7d)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class ReplaySelection:
    """Which published events to replay: all given conditions must hold (``created_at`` in
    [since, until), one of the types, keys and ids when given, ``_id`` after ``after``)."""

    since: _dt.datetime | None = None
    until: _dt.datetime | None = None
    types: Sequence[str] = ()
    keys: Sequence[str] = ()
    ids: Sequence[ObjectId] = ()
    #: Go on after this event (the last one a stopped replay published).
    after: ObjectId | None = None

    def __post_init__(self) -> None:
        if not (self.since or self.until or self.types or self.keys or self.ids or self.after):
            raise ConfigurationError(
                "replay needs a selector: --since, --until, --type, --key, --id or --after "
                "(use --since with an old date to replay everything)"
            )
        if self.since and self.until and self.since >= self.until:
            raise ConfigurationError("--since must be before --until")

    def query(self) -> dict[str, Any]:
        """The outbox query selecting these events."""
        query: dict[str, Any] = {"status": STATUS_PUBLISHED}
        created: dict[str, Any] = {}
        ids: dict[str, Any] = {}
        # An event's id is made just before its created_at, in the same process: an _id range
        # a second wider than the time range lets the outbox's (status, _id) index select.
        # (ObjectIds hold 1970-2106: outside, the bound is left to created_at alone.)
        if self.since:
            created["$gte"] = self.since
            if (low := _object_id_at(self.since, -1)) is not None:
                ids["$gte"] = low
        if self.until:
            created["$lt"] = self.until
            if (high := _object_id_at(self.until, 1)) is not None:
                ids["$lt"] = high
        if created:
            query["created_at"] = created
        if self.ids:
            ids["$in"] = list(self.ids)
        if self.after is not None:
            ids["$gt"] = self.after
        if ids:
            query["_id"] = ids
        if self.types:
            query["type"] = {"$in": list(self.types)}
        if self.keys:
            query["key"] = {"$in": list(self.keys)}
        return query


def _object_id_at(value: _dt.datetime, shift: int) -> ObjectId | None:
    """The smallest ObjectId of ``value`` plus ``shift`` seconds (None: not an ObjectId time)."""
    seconds = (value - _EPOCH).total_seconds() + shift
    if not 0 <= seconds < 2**32:
        return None
    return ObjectId.from_datetime(_EPOCH + _dt.timedelta(seconds=seconds))


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


@dataclass
class ReplayResult:
    """What a replay did."""

    #: Events published again.
    published: int = 0
    #: Events that cannot be published (their reasons in ``skipped_reasons``, a few kept).
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    #: The last event published (in ``_id`` order: everything before it went too).
    last_id: ObjectId | None = None
    #: Set when stopped before the end (``stop``), or the publish failure that ended it.
    interrupted: bool = False
    error: PublishError | None = None

    @property
    def failure(self) -> str | None:
        """Why the replay is incomplete, in a sentence (None: it is complete)."""
        if self.error is not None or self.interrupted:
            last = (
                f"; the last replayed event is {self.last_id}: rerun with --after {self.last_id} "
                "to go on"
                if self.last_id
                else ""
            )
            why = f"publishing failed: {self.error}" if self.error else "interrupted"
            return f"replay stopped, {why}{last}"
        if self.skipped:
            n = f"{self.skipped} event{'s' if self.skipped != 1 else ''}"
            return f"replay incomplete: skipped {n} that cannot be published (reasons above)"
        return None


class Replay:
    """Replays the events of ``selection`` from ``collection`` through ``publisher``.

    ``to_topic`` sends everything to one topic instead of each event's own (events without a
    topic go to ``default_topic``); ``rate`` caps events per second; ``fmt`` is the message
    format (its replay mark is added). ``on_progress(done, total)`` is called after each batch.
    """

    def __init__(
        self,
        collection: Collection[Any],
        publisher: Publisher | None,
        selection: ReplaySelection,
        *,
        fmt: MessageFormat | None = None,
        to_topic: str | None = None,
        default_topic: str | None = None,
        rate: float | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ConfigurationError(
                f"--rate must be a positive number of events per second, not {rate}"
            )
        self._collection = collection
        self._publisher = publisher
        self.selection = selection
        self._fmt = MessageFormat(fmt.cloudevents_source if fmt else None, replay=True)
        self._to_topic = check_topic(to_topic)
        self._default_topic = check_topic(default_topic)
        self._rate = rate
        self._on_progress = on_progress
        self._clock = clock
        self._sleep = sleep

    def count_by_topic(self) -> dict[str, int]:
        """How many events the selection holds per destination topic (what ``--dry-run``
        shows); events with nowhere to go are counted under ``""``."""
        pipeline: list[Mapping[str, Any]] = [
            {"$match": self.selection.query()},
            {"$group": {"_id": "$topic", "n": {"$sum": 1}}},
        ]
        counts: dict[str, int] = {}
        for row in self._collection.aggregate(pipeline):
            topic = self._to_topic or (row["_id"] if isinstance(row["_id"], str) else None)
            name = topic or self._default_topic or ""
            counts[name] = counts.get(name, 0) + row["n"]
        return counts

    def run(self, stop: threading.Event | None = None) -> ReplayResult:
        """Publish the selection again; return what was done (a permanent failure, or
        transient ones for two minutes, end it with ``error`` set). ``stop`` ends it after the
        batch in flight, and cuts short the waits of ``rate`` and of retries."""
        if self._publisher is None:
            raise ConfigurationError("a replay without a publisher can only count")
        stop = stop or threading.Event()
        # The count is only for the progress display: without one, no extra pass over the index.
        total = sum(self.count_by_topic().values()) if self._on_progress else 0
        result = ReplayResult()
        started = self._clock()
        done = 0
        for batch in self._batches(result):
            if self._rate:
                wait = started + done / self._rate - self._clock()
                if wait > 0:
                    self._wait(wait, stop)
            if stop.is_set():
                result.interrupted = True
                break
            sent, error = self._publish(batch, stop)
            done += sent
            result.published += sent
            if error is not None:
                result.error, result.interrupted = error, True
                break
            result.last_id = batch[-1].event_id
            if self._on_progress:
                self._on_progress(done + result.skipped, total)
        return result

    def _batches(self, result: ReplayResult) -> Iterator[list[Message]]:
        limit = _BATCH if not self._rate else max(1, min(_BATCH, int(self._rate)))
        raws: Collection[RawBSONDocument] = self._collection.with_options(codec_options=RAW)
        # Fetched a batch at a time: a slow --rate never leaves the cursor idle for long (the
        # server drops cursors idle for ten minutes).
        query = self.selection.query()
        with raws.find(query, sort=[("_id", 1)], batch_size=limit) as cursor:
            for docs in raw_batches(cursor, limit):
                batch = [m for raw in docs if (m := self._message(raw, result)) is not None]
                if batch:
                    yield batch

    def _message(self, raw: RawBSONDocument, result: ReplayResult) -> Message | None:
        doc = decode_document(raw)
        event_id = doc.event_id if isinstance(doc, Poison) else doc.get("_id")
        try:
            if isinstance(doc, Poison):
                raise PoisonEventError(doc.reason)
            message = message_from_document(doc, self._default_topic, self._fmt)
            if self._to_topic is not None:
                message = dataclasses.replace(message, topic=self._to_topic)
            elif message.topic is None:
                raise PoisonEventError("it has no topic: give --default-topic or --to-topic")
        except PoisonEventError as exc:
            result.skipped += 1
            if len(result.skipped_reasons) < 10:
                result.skipped_reasons.append(f"{event_id}: {exc}")
            return None
        return message

    def _publish(
        self, batch: list[Message], stop: threading.Event
    ) -> tuple[int, PublishError | None]:
        """Publish ``batch``, retrying what failed transiently (in order: the publisher fails
        a key's later messages after its first failure, so retrying keeps per-key order).
        Return how many were confirmed, and the error that ended it early."""
        delay, deadline, sent = 0.5, self._clock() + _RETRY_FOR, 0
        while True:
            assert self._publisher is not None
            results = self._publisher.publish(batch)
            failed = [(m, e) for m, e in zip(batch, results, strict=True) if e is not None]
            sent += len(batch) - len(failed)
            if not failed:
                return sent, None
            permanent = [e for _, e in failed if not isinstance(e, TransientPublishError)]
            if permanent or self._clock() >= deadline or stop.is_set():
                return sent, (permanent or [failed[0][1]])[0]
            batch = [m for m, _ in failed]
            self._wait(delay, stop)
            delay = min(delay * 2, 10.0)

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        if self._sleep is None:
            stop.wait(seconds)
        else:
            self._sleep(seconds)
