"""One active relay per outbox: a lease with an owner, an expiry and a fencing number.

The lease lives in the relay's state document. Expiry is computed from the server's clock
(``$$NOW``) so relays on hosts with skewed clocks agree. The holder trusts its lease only until
``ttl`` minus a margin after the *start* of its last successful renewal, measured on its own
monotonic clock, so it stops publishing before anyone else may take over.

Taking the lease also repairs a state document that is not as this module writes it (a fence
that is not a non-negative integer, an owner that is not a string, an expiry that is not a
date): such a lease holds nothing, and a bad fence restarts from a valid integer with a bump.
What it found is logged as a WARNING and kept in the document's ``last_repair`` field.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from .._errors import ConfigurationError, LeaseLostError
from .._mongo_errors import is_auth_failure
from .._store import lenient, state_collection_name

__all__ = ["LIVE_LEASE", "Lease", "new_owner_id", "shared_outbox_warning"]

log = logging.getLogger("mongo_outbox.relay")

#: Aggregation expression, true for a relay state document whose lease is held now: a string
#: owner and a date expiry later than the server's clock. Anything else holds nothing.
LIVE_LEASE: dict[str, Any] = {
    "$and": [
        {"$eq": [{"$type": "$lease_owner"}, "string"]},
        {"$eq": [{"$type": "$lease_expires_at"}, "date"]},
        {"$gt": ["$lease_expires_at", "$$NOW"]},
    ]
}


def shared_outbox_warning(names: Sequence[str], outbox: str) -> str:
    """The warning about several relay names publishing from one outbox."""
    listed = f"{', '.join(names[:-1])} and {names[-1]}"
    verb = "both publish" if len(names) == 2 else "all publish"
    return (
        f"relay names {listed} {verb} from outbox {outbox}: every event is published by each; "
        "give them the same --name (one active, others standby)"
    )


#: Largest valid fence: doubles are exact up to here, and bumping it cannot overflow an Int64.
MAX_FENCE = 2**53
#: Server error codes that say the relay's user may not do this: Unauthorized, AuthenticationFailed.
_NUMBERS = ["int", "long", "double", "decimal"]
_ABSENT = ["missing", "null"]
_CHECK = "_outbox_lease_check"  # scratch field of the acquiring update, removed by it


def _in_range(value: str) -> dict[str, Any]:
    return {"$and": [{"$gte": [value, 0]}, {"$lte": [value, MAX_FENCE]}]}


def _acquire_pipeline(owner: str, ttl_ms: int, call: str) -> list[dict[str, Any]]:
    """The update that takes the lease for ``owner``, repairing fields of the wrong shape."""
    fence_type = {"$type": "$fence"}
    fence_ok = {
        "$or": [
            {"$in": [fence_type, _ABSENT]},  # never set: counts from 0
            {"$and": [{"$in": [fence_type, ["int", "long"]]}, _in_range("$fence")]},
        ]
    }
    owner_ok = {"$in": [{"$type": "$lease_owner"}, ["string", *_ABSENT]]}
    expiry_ok = {"$in": [{"$type": "$lease_expires_at"}, ["date", "missing"]]}
    check = f"${_CHECK}"
    # A bad fence restarts from its ceiling when it is a number in range, else from the
    # server's time in milliseconds (above any fence counted up from 0), and is always bumped:
    # whoever held it must not pass the fenced filter again.
    restart = {
        "$cond": [
            {"$and": [{"$in": [fence_type, _NUMBERS]}, _in_range("$fence")]},
            {"$ceil": "$fence"},
            {"$toLong": "$$NOW"},
        ]
    }
    current = {"$cond": [{"$in": [fence_type, _ABSENT]}, 0, "$fence"]}
    taking_over = {"$ne": ["$lease_owner", owner]}
    new_fence = {
        "$toLong": {
            "$cond": [
                fence_ok,
                {"$cond": [taking_over, {"$add": [current, 1]}, current]},
                {"$add": [restart, 1]},
            ]
        }
    }
    was_fence = {
        "$switch": {
            "branches": [
                # Only numbers are kept: a string may not even be valid UTF-8.
                {"case": {"$in": [fence_type, _NUMBERS]}, "then": "$fence"},
            ],
            "default": "$$REMOVE",
        }
    }
    return [
        {
            "$set": {
                _CHECK: {
                    "fence": new_fence,
                    "fence_ok": fence_ok,
                    "owner_ok": owner_ok,
                    "expiry_ok": expiry_ok,
                }
            }
        },
        {
            "$set": {
                "fence": f"{check}.fence",
                "lease_owner": owner,
                "lease_expires_at": {"$add": ["$$NOW", ttl_ms]},
                # What was repaired, kept for the record until the next repair.
                "last_repair": {
                    "$cond": [
                        {"$and": [f"{check}.fence_ok", f"{check}.owner_ok", f"{check}.expiry_ok"]},
                        "$last_repair",
                        {
                            "call": call,
                            "at": "$$NOW",
                            "owner": owner,
                            "fence": f"{check}.fence",
                            "fence_ok": f"{check}.fence_ok",
                            "owner_ok": f"{check}.owner_ok",
                            "expiry_ok": f"{check}.expiry_ok",
                            "was_fence": was_fence,
                            "was_fence_type": fence_type,
                            "was_owner_type": {"$type": "$lease_owner"},
                            "was_expiry_type": {"$type": "$lease_expires_at"},
                        },
                    ]
                },
            }
        },
        {"$unset": _CHECK},
    ]


def new_owner_id() -> str:
    """A unique, readable lease owner: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The lease of relay ``name`` in ``state`` for ``owner``."""

    def __init__(
        self,
        state: Collection[Any],
        name: str,
        owner: str,
        ttl: float,
        margin: float = 0.25,
        *,
        group: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        if ttl <= 0:
            raise ConfigurationError("lease ttl must be positive")
        self.state = state
        self.name = name
        #: The relay name of a group's partition lease (None: the lease of an ungrouped relay).
        self.group = group
        self._tags = tags or {}
        # Live leases that split this outbox another way: a relay of this name without
        # partitions waits for a group's partition leases, a partition's lease for the lease
        # of a relay without partitions or of a group with another partition count.
        leases_of = {"group": group or name, "kind": {"$ne": "member"}}
        self._rivals: dict[str, Any] = (
            leases_of
            if group is None
            else {
                "$or": [
                    {"_id": group},
                    {**leases_of, "partitions": {"$ne": self._tags.get("partitions")}},
                ]
            }
        )
        self.owner = owner
        self.ttl = ttl
        self.fence: int | None = None
        self._valid_until = 0.0
        self._renewed_at = 0.0
        self._margin = ttl * margin
        suffix = state_collection_name("")
        #: The outbox, as ``database.collection``.
        self.outbox = f"{state.database.name}.{state.name.removesuffix(suffix)}"
        self._warned: set[str] = set()
        self._warned_rival = False

    @property
    def held(self) -> bool:
        """True while the lease is ours and not about to expire."""
        return self.fence is not None and time.monotonic() < self._valid_until

    def remaining(self) -> float:
        """Seconds the lease can still be trusted (0 when not held)."""
        if self.fence is None:
            return 0.0
        return max(0.0, self._valid_until - time.monotonic())

    def since_renewal(self) -> float | None:
        """Seconds since the start of the last successful renewal (or acquisition); None when
        the lease is not held."""
        if not self.held:
            return None
        return max(0.0, time.monotonic() - self._renewed_at)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease is held."""
        if not self.held:
            raise LeaseLostError(f"relay {self.name!r} no longer holds its lease")

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; bump the fence if new.

        A lease whose owner is not a string or whose expiry is not a date holds nothing; a
        fence of the wrong shape is repaired (see the module docstring), with a WARNING.
        Raises :class:`ConfigurationError` when MongoDB refuses the relay's user; other
        server errors are logged as such and raised.
        """
        started = time.monotonic()
        call = uuid.uuid4().hex
        try:
            # $expr cannot appear in an upsert's filter: make sure the document exists first.
            self.state.update_one(
                {"_id": self.name},
                {"$setOnInsert": {"fence": 0, "lease_owner": None, **self._tags}},
                upsert=True,
            )
            doc = self.state.find_one_and_update(
                {
                    "_id": self.name,
                    "$or": [
                        {"lease_owner": self.owner},
                        # Only a string owner with a date expiry holds the lease: with anything
                        # else (BSON orders timestamps, regexes, MaxKey above dates) a $lt on the
                        # expiry alone would wait for ever.
                        {"lease_owner": {"$not": {"$type": "string"}}},
                        {"lease_expires_at": {"$not": {"$type": "date"}}},
                        {"$expr": {"$lt": ["$lease_expires_at", "$$NOW"]}},
                    ],
                },
                _acquire_pipeline(self.owner, int(self.ttl * 1000), call),
                # Only what is needed: other fields may hold bytes that cannot be decoded.
                projection={"fence": 1, "last_repair": 1},
                return_document=ReturnDocument.AFTER,
            )
        except OperationFailure as exc:
            if is_auth_failure(exc):
                raise ConfigurationError(
                    f"MongoDB refused the lease of relay {self.name!r} on {self.state.full_name}: "
                    f"{_reason(exc)}"
                ) from exc
            log.warning(
                "MongoDB refused to update the lease of relay %r on %s (code %s): %s",
                self.name,
                self.state.full_name,
                exc.code,
                _reason(exc),
            )
            raise
        if doc is None:
            return False  # someone else holds an unexpired lease
        fence = int(doc["fence"])
        if self._rival_live():
            # Taken first, checked after, on both sides: of two relays taking leases that
            # split the outbox differently at the same moment, at least one sees the other.
            self.fence = fence
            self.release()
            return False
        repair = doc.get("last_repair")
        if isinstance(repair, dict) and repair.get("call") == call:
            log.warning(
                "relay %r repaired its state document in %s: %s; took the lease as %s "
                "with fence %d",
                self.name,
                self.state.full_name,
                _describe(repair),
                self.owner,
                fence,
            )
        elif fence != self.fence:
            log.info("relay %r acquired the lease as %s (fence %d)", self.name, self.owner, fence)
        self.fence = fence
        self._renewed_at = started
        self._valid_until = started + self.ttl - self._margin
        return True

    def renew(self) -> bool:
        """Extend the lease; False (and the lease dropped) if another relay has taken it."""
        if self.fence is None:
            return False
        started = time.monotonic()
        result = self.state.update_one(
            self._unexpired(),
            [{"$set": {"lease_expires_at": {"$add": ["$$NOW", int(self.ttl * 1000)]}}}],
        )
        if result.matched_count == 0:
            log.warning(
                "relay %r lost its lease (fence %d moved, or it expired)", self.name, self.fence
            )
            self.fence = None
            return False
        self._renewed_at = started
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

    def confirm(self) -> None:
        """Check on the server that the lease is still ours (owner and fence unchanged, not
        expired); raise :class:`LeaseLostError`, dropping it, if not."""
        self.check()
        if self.state.find_one(self._unexpired(), {"_id": 1}) is None:
            log.warning(
                "relay %r lost its lease (fence %s moved, or it expired)", self.name, self.fence
            )
            self.fence = None
            raise LeaseLostError(f"relay {self.name!r} lost its lease (moved or expired)")

    def _rival_live(self) -> bool:
        """Whether a live lease splits this outbox another way (see ``_rivals``); warns once."""
        found = lenient(self.state).find_one({**self._rivals, "$expr": LIVE_LEASE}, {"_id": 1})
        if found is not None and not self._warned_rival:
            self._warned_rival = True
            log.warning(
                "relay %r waits: %r on %s is live and splits the outbox another way (with or "
                "without --partitions, or another count); it takes over once that one stops",
                self.name,
                str(found["_id"]),
                self.outbox,
            )
        return found is not None

    def _unexpired(self) -> dict[str, Any]:
        # An expired lease is not renewed even if nobody took it: whoever runs must take it
        # anew, which checks for relays that split the outbox another way meanwhile.
        return {**self.fenced(), "$expr": {"$gt": ["$lease_expires_at", "$$NOW"]}}

    def fenced(self) -> dict[str, Any]:
        """The filter that makes a state write conditional on still holding the lease."""
        return {"_id": self.name, "lease_owner": self.owner, "fence": self.fence}

    def others_active(self) -> list[str]:
        """Other relay names on this outbox that hold a live lease (by server time), sorted.

        Each of them publishes every event too: relays meant to share the work share a name.
        """
        name = self.group or self.name
        rows = lenient(self.state).find(
            {"_id": {"$ne": name}, "group": {"$ne": name}, "$expr": LIVE_LEASE},
            {"_id": 1, "group": 1},
            sort=[("_id", 1)],
        )
        # A group counts once, by its name.
        return sorted({str(row.get("group") or row["_id"]) for row in rows})

    def warn_other_relays(self) -> list[str]:
        """:meth:`others_active`, with a WARNING the first time each other name shows up."""
        others = self.others_active()
        for other in others:
            if other not in self._warned:
                self._warned.add(other)
                log.warning(
                    "%s", shared_outbox_warning([self.group or self.name, other], self.outbox)
                )
        return others


def _reason(exc: OperationFailure) -> str:
    details = exc.details or {}
    return str(details.get("errmsg") or exc)


def _describe(repair: dict[str, Any]) -> str:
    """What the acquiring update found wrong, from its ``last_repair`` record."""
    parts = []
    if not repair.get("fence_ok"):
        shown = f"{repair['was_fence']!r} " if "was_fence" in repair else ""
        parts.append(
            f"fence {shown}({repair.get('was_fence_type')}) is not an integer from 0 to 2**53: "
            "restarted and bumped (any previous holder is fenced off)"
        )
    if not repair.get("owner_ok"):
        parts.append(f"lease_owner of type {repair.get('was_owner_type')} taken as no owner")
    if not repair.get("expiry_ok"):
        parts.append(f"lease_expires_at of type {repair.get('was_expiry_type')} taken as expired")
    return "; ".join(parts)
