"""Slots and partitions: how a group of relays splits one outbox without splitting a key.

Every outbox document carries ``slot``, a number in ``[0, SLOTS)`` computed at ``emit`` from
its ordering key (from its id when it has none), so all events of one key share one slot. A
relay group with ``--partitions N`` splits the slots into N contiguous ranges; partition ``i``
owns ``[i * SLOTS // N, (i + 1) * SLOTS // N)``. Partition 0 also owns every document whose
``slot`` is missing or not a number in range (written before slots existed, or by hand), so
the partitions cover every document exactly once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from bson import Decimal128, ObjectId

__all__ = ["SLOTS", "Partition", "slot_for"]

#: Number of slots. Part of the stored format: changing it would move keys between slots.
SLOTS = 1024


def slot_for(key: str | None, event_id: ObjectId) -> int:
    """The slot of an event: CRC-32 (zlib's, IEEE 802.3) of the UTF-8 key, modulo SLOTS.

    An event without a key hashes its id's 12 bytes instead (it has no order to keep). The
    function is part of the stored format: every process and version must agree on it.
    """
    data = key.encode("utf-8") if key is not None else event_id.binary
    return zlib.crc32(data) % SLOTS


@dataclass(frozen=True, slots=True)
class Partition:
    """Partition ``index`` of ``count``: a range of slots with its own lease and checkpoint."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= SLOTS:
            raise ValueError(f"partitions must be between 1 and {SLOTS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} is not one of 0..{self.count - 1}")

    @property
    def whole(self) -> bool:
        """True for the single partition of an ungrouped relay (today's behaviour)."""
        return self.count == 1

    @property
    def low(self) -> int:
        """First slot of the range."""
        return self.index * SLOTS // self.count

    @property
    def high(self) -> int:
        """First slot after the range."""
        return (self.index + 1) * SLOTS // self.count

    def state_id(self, name: str) -> str:
        """``_id`` of this partition's state document (lease, fence, checkpoint).

        The single partition keeps the relay's name, so ``--partitions 1`` reads and writes
        exactly the state it always did.
        """
        return name if self.whole else f"{name}#{self.index}/{self.count}"

    def match(self, field: str = "slot") -> dict[str, Any]:
        """A query on ``field`` selecting this partition's documents (empty when whole)."""
        if self.whole:
            return {}
        if self.index == 0:
            # Everything the other partitions do not own, including no slot and bad slots.
            # An array (written by hand) could meet a range with two different elements.
            return {
                "$or": [
                    {field: {"$not": {"$gte": self.high, "$lt": SLOTS}}},
                    {field: {"$type": "array"}},
                ]
            }
        return {field: {"$gte": self.low, "$lt": self.high, "$not": {"$type": "array"}}}

    def owns(self, slot: Any) -> bool:
        """Whether a document with this ``slot`` value belongs here (same rule as match)."""
        if isinstance(slot, Decimal128):
            slot = float(slot.to_decimal())
        number = isinstance(slot, int | float) and not isinstance(slot, bool)
        in_range = number and 0 <= slot < SLOTS
        if self.index == 0:
            return not (in_range and slot >= self.high)
        return in_range and self.low <= slot < self.high

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
