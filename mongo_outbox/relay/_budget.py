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
        self._cond = threading.Condition()

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, size: int, timeout: float) -> bool:
        """Add ``item``; False if there was no room within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._items and (
                len(self._items) >= self.max_items or self._bytes + size > self.max_bytes
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._items.append((item, size))
            self._bytes += size
            self._cond.notify_all()
            return True

    def take(self, max_items: int, max_bytes: int, timeout: float) -> list[T]:
        """Up to ``max_items`` items and about ``max_bytes`` (at least one item if any comes
        within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            taken: list[T] = []
            size = 0
            while self._items and len(taken) < max_items:
                item, item_size = self._items[0]
                if taken and size + item_size > max_bytes:
                    break
                self._items.popleft()
                taken.append(item)
                size += item_size
            self._bytes -= size
            self._cond.notify_all()
            return taken
