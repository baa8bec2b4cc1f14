"""One active relay per outbox: a lease with an owner, an expiry and a fencing number.

The lease lives in the relay's state document. Expiry is computed from the server's clock
(``$$NOW``) so relays on hosts with skewed clocks agree. The holder trusts its lease only until
``ttl`` minus a margin after the *start* of its last successful renewal, measured on its own
monotonic clock, so it stops publishing before anyone else may take over.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from pymongo import ReturnDocument
from pymongo.collection import Collection

from .._errors import LeaseLostError

__all__ = ["Lease", "new_owner_id"]

log = logging.getLogger("mongo_outbox.relay")


def new_owner_id() -> str:
    """A unique, readable lease owner: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The lease of relay ``name`` in ``state`` for ``owner``."""

    def __init__(
        self, state: Collection[Any], name: str, owner: str, ttl: float, margin: float = 0.25
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.state = state
        self.name = name
        self.owner = owner
        self.ttl = ttl
        self.fence: int | None = None
        self._valid_until = 0.0
        self._margin = ttl * margin

    @property
    def held(self) -> bool:
        """True while the lease is ours and not about to expire."""
        return self.fence is not None and time.monotonic() < self._valid_until

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease is held."""
        if not self.held:
            raise LeaseLostError(f"relay {self.name!r} no longer holds its lease")

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; bump the fence if new."""
        started = time.monotonic()
        ttl_ms = int(self.ttl * 1000)
        taking_over = {"$ne": ["$lease_owner", self.owner]}
        # $expr cannot appear in an upsert's filter: make sure the document exists first.
        self.state.update_one(
            {"_id": self.name}, {"$setOnInsert": {"fence": 0, "lease_owner": None}}, upsert=True
        )
        doc = self.state.find_one_and_update(
            {
                "_id": self.name,
                "$or": [
                    {"lease_owner": self.owner},
                    {"lease_owner": None},
                    {"$expr": {"$lt": ["$lease_expires_at", "$$NOW"]}},
                ],
            },
            [
                {
                    "$set": {
                        "fence": {
                            "$cond": [
                                taking_over,
                                {"$add": [{"$ifNull": ["$fence", 0]}, 1]},
                                "$fence",
                            ]
                        },
                        "lease_owner": self.owner,
                        "lease_expires_at": {"$add": ["$$NOW", ttl_ms]},
                    }
                }
            ],
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return False  # someone else holds an unexpired lease
        fence = int(doc["fence"])
        if fence != self.fence:
            log.info("relay %r acquired the lease as %s (fence %d)", self.name, self.owner, fence)
        self.fence = fence
        self._valid_until = started + self.ttl - self._margin
        return True

    def renew(self) -> bool:
        """Extend the lease; False (and the lease dropped) if another relay has taken it."""
        if self.fence is None:
            return False
        started = time.monotonic()
        result = self.state.update_one(
            {"_id": self.name, "lease_owner": self.owner, "fence": self.fence},
            [{"$set": {"lease_expires_at": {"$add": ["$$NOW", int(self.ttl * 1000)]}}}],
        )
        if result.matched_count == 0:
            log.warning("relay %r lost its lease (fence %d)", self.name, self.fence)
            self.fence = None
            return False
        self._valid_until = started + self.ttl - self._margin
        return True

    def release(self) -> None:
        """Give the lease up so a standby can take over at once."""
        if self.fence is None:
            return
        self.state.update_one(
            {"_id": self.name, "lease_owner": self.owner, "fence": self.fence},
            {"$set": {"lease_owner": None}},
        )
        self.fence = None

    def fenced(self) -> dict[str, Any]:
        """The filter that makes a state write conditional on still holding the lease."""
        return {"_id": self.name, "lease_owner": self.owner, "fence": self.fence}
