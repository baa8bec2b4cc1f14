"""Who is in a relay group, and which partitions each member should own.

Members heartbeat in the relay state collection: one document per member, kept alive like a
lease (``lease_owner``, ``lease_expires_at`` by the server's clock). Every member reads the
same live members and computes the same :func:`assign`, so they agree without a coordinator;
while views differ for a moment (a join not yet seen), the partitions' own leases keep any
partition from being published by two members at once.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from pymongo.collection import Collection

from .._store import lenient
from ._lease import LIVE_LEASE

__all__ = ["Membership", "assign", "member_state_id"]

log = logging.getLogger("mongo_outbox.relay")


def member_state_id(name: str, owner: str) -> str:
    """``_id`` of a member's heartbeat document."""
    return f"{name}#member:{owner}"


def _weight(member: str, partition: int) -> int:
    return zlib.crc32(f"{member}/{partition}".encode())


def assign(members: list[str], count: int) -> dict[str, list[int]]:
    """Partitions per member: ``count // len(members)`` each, one more for the first
    ``count % len(members)`` members in sorted order; each partition goes to the member that
    ranks it highest (rendezvous hashing) among those with room, so a join or a leave moves
    few partitions."""
    ranked = sorted(set(members))
    if not ranked:
        return {}
    share, extra = divmod(count, len(ranked))
    quota = {m: share + (1 if i < extra else 0) for i, m in enumerate(ranked)}
    owned: dict[str, list[int]] = {m: [] for m in ranked}
    for partition in range(count):
        for member in sorted(ranked, key=lambda m: (-_weight(m, partition), m)):
            if len(owned[member]) < quota[member]:
                owned[member].append(partition)
                break
    return owned


class Membership:
    """Member ``owner`` of group ``name`` (``count`` partitions) in the ``state`` collection."""

    def __init__(
        self, state: Collection[Any], name: str, owner: str, count: int, ttl: float
    ) -> None:
        self.state = state
        self.name = name
        self.owner = owner
        self.count = count
        self.ttl = ttl
        self._id = member_state_id(name, owner)
        self._warned: set[str] = set()

    def beat(self, owns: list[int]) -> list[str]:
        """Renew this member's heartbeat (recording the partitions it owns); return the live
        members of the group with the same partition count, sorted, this one included."""
        self.state.update_one(
            {"_id": self._id},
            [
                {
                    "$set": {
                        "group": self.name,
                        "kind": "member",
                        "partitions": self.count,
                        "lease_owner": self.owner,
                        "lease_expires_at": {"$add": ["$$NOW", int(self.ttl * 1000)]},
                        "since": {"$ifNull": ["$since", "$$NOW"]},
                        "owns": {"$literal": owns},
                    }
                }
            ],
            upsert=True,
        )
        rows = lenient(self.state).find(
            {"group": self.name, "kind": "member", "partitions": self.count, "$expr": LIVE_LEASE},
            {"lease_owner": 1},
        )
        members = {str(row["lease_owner"]) for row in rows}
        members.add(self.owner)  # even if the server's clock says otherwise
        return sorted(members)

    def blockers(self) -> list[str]:
        """Live leases of this name that split the outbox differently: the lease of a relay
        without partitions, or partition leases of another partition count."""
        rows = lenient(self.state).find(
            {
                "$or": [
                    {"_id": self.name},
                    # Leases only: a member waiting on the other side holds nothing.
                    {
                        "group": self.name,
                        "kind": {"$ne": "member"},
                        "partitions": {"$ne": self.count},
                    },
                ],
                "$expr": LIVE_LEASE,
            },
            {"partitions": 1},
        )
        found = []
        for row in rows:
            parts = row.get("partitions", 1)
            found.append(f"{row['_id']} (--partitions {parts})")
        for blocker in found:
            if blocker not in self._warned:
                self._warned.add(blocker)
                log.warning(
                    "relay %s is live on this outbox and splits it differently than "
                    "--partitions %d: this member waits until it stops (changing the partition "
                    "count needs every relay of the name stopped first)",
                    blocker,
                    self.count,
                )
        return found

    def leave(self) -> None:
        """Remove this member's heartbeat, so the others rebalance at once."""
        self.state.delete_one({"_id": self._id, "lease_owner": self.owner})

    def prune(self, older_than: float = 3600.0) -> None:
        """Delete heartbeats of members gone for ``older_than`` seconds (crashed members)."""
        self.state.delete_many(
            {
                "group": self.name,
                "kind": "member",
                "$expr": {
                    "$lt": ["$lease_expires_at", {"$subtract": ["$$NOW", int(older_than * 1000)]}]
                },
            }
        )
