"""Open the outbox change stream and read it from a thread into a byte-bounded queue.

Reading in its own thread overlaps the next getMore with publishing the current batch. The
stream is read as raw BSON and each inserted document is decoded on its own, so one document
that cannot be decoded becomes poison instead of breaking the stream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bson.errors import InvalidBSON, InvalidDocument
from bson.raw_bson import RawBSONDocument
from pymongo.change_stream import CollectionChangeStream
from pymongo.errors import OperationFailure

from .._document import Event, Poison
from .._partition import Partition
from .._store import PUBLISH_PROJECTION, RAW, OutboxStore
from ._budget import BudgetQueue, ByteBudget

__all__ = ["Change", "Idle", "StreamFailed", "Tailer", "open_stream"]

log = logging.getLogger("mongo_outbox.relay")

_CHANGE_PROJECTION: dict[str, int] = {
    "_id": 1,
    "clusterTime": 1,
    **{f"fullDocument.{field}": 1 for field in ("_id", *PUBLISH_PROJECTION)},
}


def _pipeline(partition: Partition) -> list[dict[str, Any]]:
    """Inserts of ``partition``'s documents, filtered on the server."""
    return [
        {"$match": {"operationType": "insert", **partition.match("fullDocument.slot")}},
        # Only what publishing needs: decoding change events is the tailer's main cost.
        {"$project": _CHANGE_PROJECTION},
    ]


def open_stream(
    store: OutboxStore,
    token: Mapping[str, Any] | None,
    at: Callable[[], Any],
    *,
    await_seconds: float,
    batch_size: int,
    partition: Partition,
) -> tuple[CollectionChangeStream[Any], bool]:
    """Open ``partition``'s stream after ``token``, or at cluster time ``at()`` when there is
    none or it is unusable; return the stream and whether it started without the token (a
    recovery)."""
    outbox = store.outbox.with_options(codec_options=RAW)
    pipeline = _pipeline(partition)
    options: dict[str, Any] = {
        "max_await_time_ms": int(await_seconds * 1000),
        "batch_size": batch_size,
    }
    if token is not None:
        try:
            stream = outbox.watch(pipeline, start_after=token, **options)
            log.info("resumed change stream from checkpoint")
            return stream, False
        except (OperationFailure, InvalidDocument, InvalidBSON, TypeError, ValueError) as exc:
            log.warning(
                "saved resume token is unusable (%s: %s): recovering by a full sweep",
                type(exc).__name__,
                exc,
            )
    else:
        log.info("no checkpoint: recovering by a full sweep")
    return outbox.watch(pipeline, start_at_operation_time=at(), **options), True


@dataclass(slots=True)  # not frozen: one is built per change, and frozen costs more
class Change:
    """An inserted outbox document with the stream position after it."""

    record: Event | Poison
    event_id: Any
    token: Mapping[str, Any] | None
    cluster_time: Any


@dataclass(frozen=True, slots=True)
class Idle:
    """The stream had nothing new; ``token`` is its advanced position."""

    token: Mapping[str, Any] | None
    at: float  # time.monotonic() when the empty getMore returned


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """Reading the stream raised; the relay reopens it."""

    error: BaseException


Item = Change | Idle | StreamFailed


class Tailer:
    """Feeds a change stream's inserts into a :class:`BudgetQueue` from a daemon thread.

    ``convert`` turns a raw inserted document into what the relay publishes (or poison).
    """

    def __init__(
        self,
        stream: CollectionChangeStream[Any],
        convert: Callable[[RawBSONDocument], Event | Poison],
        *,
        max_bytes: int,
        max_items: int,
        budget: ByteBudget | None = None,
    ) -> None:
        self._stream = stream
        self._convert = convert
        self.queue: BudgetQueue[Item] = BudgetQueue(max_bytes, max_items, budget)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-tailer", daemon=True)

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and close the stream (waits for the current getMore)."""
        self._halt.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self._stream.close()

    def _put(self, item: Item, size: int = 0) -> bool:
        while not self._halt.is_set():
            if self.queue.put(item, size, timeout=0.2):
                return True
        return False

    def _run(self) -> None:
        stream = self._stream
        while not self._halt.is_set():
            try:
                change = stream.try_next()
                if change is None and not stream.alive:
                    raise RuntimeError("change stream closed (invalidated)")
                if change is None:
                    item: Item = Idle(stream.resume_token, time.monotonic())
                    size = 0
                else:
                    # The change's own _id is its resume token; ChangeStream.resume_token
                    # would deep-copy a raw document per change (40 µs, the tailer's main cost).
                    item, size = self._change(change, change["_id"])
            except BaseException as exc:
                self._put(StreamFailed(exc))
                return
            if not self._put(item, size):
                return

    def _change(self, change: Any, token: Mapping[str, Any] | None) -> tuple[Change, int]:
        # Only the top level of the raw change is decoded here; fullDocument stays raw.
        raw = change["fullDocument"]
        record = self._convert(raw)
        event_id = record.event_id if isinstance(record, Poison) else record.message.event_id
        return Change(record, event_id, token, change.get("clusterTime")), len(raw.raw)
