"""Overlap the relay's I/O: read the next batch and mark the last one while publishing.

Neither changes what is guaranteed: an event stays ``pending`` in MongoDB until it has been
published *and* marked, so a crash at any point means a duplicate at worst, never a loss.
"""

from __future__ import annotations

import datetime as _dt
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bson import ObjectId

from .._store import Failure, OutboxStore

__all__ = ["Marker", "prefetch"]

_DONE = object()


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer."""
    buffer: queue.Queue[Any] = queue.Queue(depth)
    halt = threading.Event()

    def put(item: Any) -> bool:
        while not halt.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(item):
                    break
        except BaseException as exc:
            put(_Raised(exc))
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        put(_DONE)

    thread = threading.Thread(target=produce, name="outbox-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        halt.set()
        thread.join()


class Marker:
    """Records publish outcomes in MongoDB from a background thread.

    :meth:`flush` waits until everything submitted is written and raises the first error a
    write hit (the relay then restarts its pipeline; unmarked events are still ``pending``).
    """

    def __init__(
        self, store: OutboxStore, depth: int = 4, on_dead: Callable[[int], None] = lambda n: None
    ) -> None:
        self._store = store
        #: Told how many events became dead once their write has landed.
        self._on_dead = on_dead
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, published: list[ObjectId], at: _dt.datetime, failures: list[Failure]) -> None:
        """Queue one batch's outcome (blocks while ``depth`` batches are pending)."""
        self._raise()
        if not (published or failures):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="outbox-marker", daemon=True)
            self._thread.start()
        self._queue.put((published, at, failures))

    def flush(self) -> None:
        """Wait for every submitted outcome to be written."""
        self._queue.join()
        self._raise()

    def check(self) -> None:
        """Raise the error a background write hit, if any (without waiting)."""
        self._raise()

    def close(self) -> None:
        """Write what is queued (errors are dropped: those events stay pending) and stop."""
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _DONE:
                    return
                published, at, failures = item
                if self._error is None:
                    self._store.mark_published(published, at)
                    self._store.record_failures(failures)
                    self._on_dead(sum(f.next_attempt_at is None for f in failures))
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()
