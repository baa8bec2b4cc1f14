"""A thread that reads the outbox change stream into a bounded queue.

Reading in its own thread overlaps the next getMore with publishing the current batch, and
the bounded queue keeps memory flat when the publisher is the slower side.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pymongo.change_stream import CollectionChangeStream

__all__ = ["Change", "Idle", "StreamFailed", "Tailer"]


@dataclass(frozen=True, slots=True)
class Change:
    """An inserted outbox document with the stream position after it."""

    doc: dict[str, Any]
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
    """Feeds a change stream's inserts into a queue from a daemon thread."""

    def __init__(self, stream: CollectionChangeStream[Any], maxsize: int) -> None:
        self._stream = stream
        self.queue: queue.Queue[Item] = queue.Queue(maxsize)
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

    def _put(self, item: Item) -> bool:
        while not self._halt.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        stream = self._stream
        while not self._halt.is_set():
            try:
                change = stream.try_next()
            except BaseException as exc:
                self._put(StreamFailed(exc))
                return
            if change is None and not stream.alive:
                self._put(StreamFailed(RuntimeError("change stream closed (invalidated)")))
                return
            if change is None:
                item: Item = Idle(stream.resume_token, time.monotonic())
            else:
                item = Change(
                    change["fullDocument"], stream.resume_token, change.get("clusterTime")
                )
            if not self._put(item):
                return
