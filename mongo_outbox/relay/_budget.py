"""A queue bounded by bytes as well as items, so big events cannot pile up in memory."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

__all__ = ["BudgetQueue"]

T = TypeVar("T")


class BudgetQueue(Generic[T]):
    """FIFO of items with sizes; :meth:`put` waits while ``max_bytes`` or ``max_items`` is full.

    An item larger than the whole budget is still let in when the queue is empty, so one big
    event never deadlocks the reader.
    """

    def __init__(self, max_bytes: int, max_items: int) -> None:
        if max_bytes < 1 or max_items < 1:
            raise ValueError("queue budgets must be positive")
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        # The lock itself is entered on the hot path (Condition's own __enter__ is Python code).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Threads waiting in take() for items, and in put() for room: a put wakes only takers,
        # a take only putters, and neither calls notify when nobody waits (once per event).
        self._takers = 0
        self._putters = 0

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, size: int, timeout: float) -> bool:
        """Add ``item``; False if there was no room within ``timeout`` seconds."""
        with self._lock:
            items = self._items
            if items and (len(items) >= self.max_items or self._bytes + size > self.max_bytes):
                deadline = time.monotonic() + timeout
                while items and (
                    len(items) >= self.max_items or self._bytes + size > self.max_bytes
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._putters += 1
                    try:
                        self._cond.wait(left)
                    finally:
                        self._putters -= 1
            items.append((item, size))
            self._bytes += size
            if self._takers:
                self._cond.notify_all()
            return True

    def take(self, max_items: int, max_bytes: int, timeout: float) -> list[T]:
        """Up to ``max_items`` items and about ``max_bytes`` (at least one item if any comes
        within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._takers += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._takers -= 1
            items = self._items
            taken: list[T]
            if len(items) <= max_items and self._bytes <= max_bytes:
                taken = [item for item, _ in items]  # all of it fits: no item by item
                items.clear()
                size = self._bytes
            else:
                taken, size = [], 0
                while items and len(taken) < max_items:
                    item, item_size = items[0]
                    if taken and size + item_size > max_bytes:
                        break
                    items.popleft()
                    taken.append(item)
                    size += item_size
            self._bytes -= size
            if self._putters:
                self._cond.notify_all()
            return taken
