"""Queues bounded by bytes as well as items, so big events cannot pile up in memory.

Several queues can share one :class:`ByteBudget` (a group member's partitions do): their bytes
together stay within it, whatever the number of queues.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

__all__ = ["BudgetQueue", "ByteBudget"]

T = TypeVar("T")


class ByteBudget:
    """Bytes that one or more :class:`BudgetQueue` may hold together, and their shared lock."""

    __slots__ = ("cond", "lock", "max_bytes", "putters", "takers", "used")

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("queue budgets must be positive")
        self.max_bytes = max_bytes
        self.used = 0
        # The lock itself is entered on the hot path (Condition's own __enter__ is Python code).
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        # Threads waiting in take() for items, and in put() for room: a put wakes only takers,
        # a take only putters, and neither calls notify when nobody waits (once per event).
        self.takers = 0
        self.putters = 0

    def full_for(self, size: int) -> bool:
        """Whether ``size`` more bytes must wait: at least one item always fits when the
        queues sharing the budget hold nothing, so one big event never deadlocks them."""
        return self.used > 0 and self.used + size > self.max_bytes


class BudgetQueue(Generic[T]):
    """FIFO of items with sizes; :meth:`put` waits while the byte budget or ``max_items`` is
    full. ``budget`` shares the bytes (and the lock) with other queues; by default the queue
    has a budget of ``max_bytes`` of its own."""

    def __init__(self, max_bytes: int, max_items: int, budget: ByteBudget | None = None) -> None:
        if max_bytes < 1 or max_items < 1:
            raise ValueError("queue budgets must be positive")
        self._budget = budget or ByteBudget(max_bytes)
        self.max_bytes = self._budget.max_bytes
        self.max_items = max_items
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._lock = self._budget.lock
        self._cond = self._budget.cond

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, size: int, timeout: float) -> bool:
        """Add ``item``; False if there was no room within ``timeout`` seconds."""
        budget = self._budget
        with self._lock:
            items = self._items
            if len(items) >= self.max_items or budget.full_for(size):
                deadline = time.monotonic() + timeout
                while len(items) >= self.max_items or budget.full_for(size):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    budget.putters += 1
                    try:
                        self._cond.wait(left)
                    finally:
                        budget.putters -= 1
            items.append((item, size))
            self._bytes += size
            budget.used += size
            if budget.takers:
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
                self._budget.takers += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._budget.takers -= 1
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
            self._budget.used -= size
            if self._budget.putters:
                self._cond.notify_all()
            return taken
