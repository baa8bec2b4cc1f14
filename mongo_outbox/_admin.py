"""Operator queries on an outbox: counts, dead events, requeue, checkpoints, relays."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from bson.errors import InvalidBSON
from pymongo.collection import Collection
from pymongo.database import Database

from ._document import STATUS_DEAD, STATUS_PENDING
from ._mongo_errors import outbox_missing
from ._partition import Partition
from ._store import count_by_status, lenient, oldest_pending, state_collection_name
from ._times import utcnow as _utcnow
from .relay._lease import LIVE_LEASE

__all__ = [
    "FailingPending",
    "FailingReason",
    "GroupInfo",
    "MemberInfo",
    "OutboxAdmin",
    "PartitionInfo",
    "RelayInfo",
]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """One relay state document as an operator sees it."""

    name: str
    #: Lease owner (None when released or not a string).
    owner: str | None
    lease_expires_at: _dt.datetime | None
    #: True while the lease is held, by the server's clock.
    live: bool
    #: Seconds the lease has left by the server's clock (None unless live).
    lease_remaining: float | None
    #: When the resume token was last saved.
    checkpoint_at: _dt.datetime | None


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A member of a relay group, from its heartbeat."""

    owner: str
    live: bool
    #: Partitions whose lease it held at its last heartbeat.
    owns: list[int]


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One partition of a relay group."""

    index: int
    #: Lease owner while live, else None.
    owner: str | None
    lease_remaining: float | None
    checkpoint_at: _dt.datetime | None
    pending: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A relay group (``--partitions`` above 1) as an operator sees it."""

    name: str
    partitions: int
    members: list[MemberInfo]
    parts: list[PartitionInfo]


@dataclass(frozen=True, slots=True)
class FailingPending:
    """Pending events that have failed: how many, their top reasons, and the rest counted."""

    events: int
    reasons: list[FailingReason]
    other_reasons: int
    other_events: int


@dataclass(frozen=True, slots=True)
class FailingReason:
    """Pending events that failed for one reason (``last_error``), to be retried."""

    error: str | None
    events: int
    #: The most attempts any of them has had.
    max_attempts: int
    #: The latest retry due among them.
    next_attempt_at: _dt.datetime | None


#: Pending events that have failed at least once (or were requeued after failing).
_FAILED_PENDING: dict[str, Any] = {
    "status": STATUS_PENDING,
    "$or": [{"attempts": {"$gt": 0}}, {"last_error": {"$type": "string"}}],
}
_EVENT_FIELDS = {"type": 1, "topic": 1, "key": 1, "attempts": 1, "last_error": 1, "created_at": 1}


class OutboxAdmin:
    """Operator queries and repairs on one outbox collection and its relay state."""

    def __init__(self, db: Database[Any], collection: str = "outbox") -> None:
        self.db = db
        self.name = f"{db.name}.{collection}"
        self.outbox: Collection[Any] = db[collection]
        self.state: Collection[Any] = db[state_collection_name(collection)]

    # -- events ----------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the outbox collection exists (asking creates nothing)."""
        return outbox_missing(self.outbox) is None

    def counts(self) -> dict[str, int]:
        """Number of events per status."""
        return count_by_status(self.outbox)

    def oldest_pending(self) -> dict[str, Any] | None:
        """The first pending event in ``_id`` order, if any."""
        return oldest_pending(self.outbox)

    def newest_errors(self, limit: int = 5) -> list[dict[str, Any]]:
        """The most recent dead events with their reasons."""
        query = {"status": STATUS_DEAD}
        fields = {"type": 1, "key": 1, "attempts": 1, "last_error": 1}
        return self._find(query, fields, limit)

    def dead_events(
        self,
        *,
        ids: Iterable[Any] | None = None,
        event_type: str | None = None,
        key: str | None = None,
        older_than: _dt.datetime | None = None,
        limit: int = 20,
    ) -> tuple[int, list[dict[str, Any]]]:
        """How many dead events match every filter given, and the newest ``limit`` of them."""
        query = _dead_query(ids, event_type, key, older_than)
        return self.outbox.count_documents(query), self._find(query, _EVENT_FIELDS, limit)

    def failing_pending(self, limit: int = 5) -> FailingPending:
        """How many pending events have failed, and their reasons: up to ``limit`` of them
        (those with the latest retry first) and a count of the rest. The server groups; only
        ``limit`` reasons are read, however many distinct ones there are."""
        by_reason: dict[str, Any] = {
            "$group": {
                "_id": "$last_error",
                "n": {"$sum": 1},
                "attempts": {"$max": "$attempts"},
                "next": {"$max": "$next_attempt_at"},
            }
        }
        totals = {"_id": None, "reasons": {"$sum": 1}, "events": {"$sum": "$n"}}
        pipeline: list[dict[str, Any]] = [
            {"$match": _FAILED_PENDING},
            by_reason,
            {
                "$facet": {
                    "top": [{"$sort": {"next": -1, "n": -1}}, {"$limit": limit}],
                    "all": [{"$group": totals}],
                }
            },
        ]
        facets: dict[str, Any] = next(
            lenient(self.outbox).aggregate(pipeline, allowDiskUse=True), {}
        )
        rows = facets.get("top", [])
        total = (facets.get("all") or [{}])[0]
        reasons = [
            FailingReason(
                error=_typed(row["_id"], str),
                events=int(row["n"]),
                max_attempts=row["attempts"] if isinstance(row["attempts"], int) else 0,
                next_attempt_at=_typed(row["next"], _dt.datetime),
            )
            for row in rows
        ]
        events = int(total.get("events", 0))
        return FailingPending(
            events=events,
            reasons=reasons,
            other_reasons=int(total.get("reasons", 0)) - len(reasons),
            other_events=events - sum(r.events for r in reasons),
        )

    def _find(
        self, query: dict[str, Any], fields: dict[str, Any], limit: int
    ) -> list[dict[str, Any]]:
        try:
            return list(self.outbox.find(query, fields, sort=[("_id", -1)], limit=limit))
        except InvalidBSON:
            # Poison may hold bytes that are not UTF-8: show them replaced rather than fail.
            return list(lenient(self.outbox).find(query, fields, sort=[("_id", -1)], limit=limit))

    def requeue(
        self,
        *,
        ids: Iterable[Any] | None = None,
        event_type: str | None = None,
        key: str | None = None,
        older_than: _dt.datetime | None = None,
    ) -> int:
        """Set dead events back to pending (all, or those matching every filter given).

        ``ids`` are ``_id`` values of any BSON type. Attempts start again from zero;
        ``last_error`` is kept for the record. Returns how many events were requeued.
        """
        result = self.outbox.update_many(
            _dead_query(ids, event_type, key, older_than),
            {
                "$set": {"status": STATUS_PENDING, "attempts": 0, "requeued_at": _utcnow()},
                "$unset": {"next_attempt_at": ""},
            },
        )
        return int(result.modified_count)

    # -- relays ----------------------------------------------------------------------------

    def reset_token(self, name: str) -> bool:
        """Forget relay ``name``'s resume token so its next start runs the gap-free recovery."""
        result = self.state.update_one({"_id": name}, {"$unset": {"resume_token": ""}})
        return bool(result.modified_count)

    def active_relays(self) -> list[RelayInfo]:
        """Every relay state document of this outbox, by name, live or not; a relay group
        (see :meth:`group`) counts as one, live while any of its members is."""
        rows = self.state.aggregate(
            [
                {"$match": {"group": {"$exists": False}}},
                {
                    "$project": {
                        "lease_owner": 1,
                        "lease_expires_at": 1,
                        "checkpoint_at": 1,
                        "live": LIVE_LEASE,
                        "remaining_ms": {
                            "$cond": [
                                LIVE_LEASE,
                                {"$subtract": ["$lease_expires_at", "$$NOW"]},
                                None,
                            ]
                        },
                    }
                },
                {"$sort": {"_id": 1}},
            ]
        )
        return [
            RelayInfo(
                name=str(row["_id"]),
                owner=_typed(row.get("lease_owner"), str),
                lease_expires_at=_typed(row.get("lease_expires_at"), _dt.datetime),
                live=bool(row["live"]),
                lease_remaining=None
                if row.get("remaining_ms") is None
                else float(row["remaining_ms"]) / 1000,
                checkpoint_at=_typed(row.get("checkpoint_at"), _dt.datetime),
            )
            for row in rows
        ] + [
            RelayInfo(str(row["_id"]), None, None, True, None, None)
            for row in self.state.aggregate(
                [
                    {"$match": {"group": {"$type": "string"}, "kind": "member"}},
                    {"$match": {"$expr": LIVE_LEASE}},
                    {"$group": {"_id": "$group"}},
                    {"$sort": {"_id": 1}},
                ]
            )
        ]

    def group(self, name: str) -> GroupInfo | None:
        """The relay group ``name``: its members, and each partition's owner, checkpoint and
        pending count (None when no relay of that name ever ran with partitions)."""
        now_ms = {"$subtract": ["$lease_expires_at", "$$NOW"]}
        project = {
            "kind": 1,
            "partition": 1,
            "partitions": 1,
            "lease_owner": 1,
            "owns": 1,
            "checkpoint_at": 1,
            "live": LIVE_LEASE,
            "remaining_ms": {"$cond": [LIVE_LEASE, now_ms, None]},
            "expires": "$lease_expires_at",
        }
        rows = list(
            lenient(self.state).aggregate(
                [{"$match": {"group": name}}, {"$project": project}, {"$sort": {"expires": -1}}]
            )
        )
        members = [r for r in rows if r.get("kind") == "member"]
        counts = [r.get("partitions") for r in members if r["live"]] or [
            r.get("partitions") for r in members
        ]
        count = counts[0] if counts and isinstance(counts[0], int) else None
        if count is None:
            return None
        parts = {
            r["partition"]: r
            for r in rows
            if r.get("kind") != "member" and r.get("partitions") == count
        }
        infos = []
        for index in range(count):
            row = parts.get(index, {})
            live = bool(row.get("live"))
            query = {"status": STATUS_PENDING, **Partition(index, count).match()}
            infos.append(
                PartitionInfo(
                    index=index,
                    owner=_typed(row.get("lease_owner"), str) if live else None,
                    lease_remaining=float(row["remaining_ms"]) / 1000 if live else None,
                    checkpoint_at=_typed(row.get("checkpoint_at"), _dt.datetime),
                    pending=self.outbox.count_documents(query),
                )
            )
        return GroupInfo(
            name=name,
            partitions=count,
            members=[
                MemberInfo(
                    owner=str(r.get("lease_owner")),
                    live=bool(r["live"]),
                    owns=[p for p in r.get("owns") or [] if isinstance(p, int)],
                )
                for r in sorted(members, key=lambda r: str(r.get("lease_owner")))
                if r.get("partitions") == count
            ],
            parts=infos,
        )


def _dead_query(
    ids: Iterable[Any] | None,
    event_type: str | None,
    key: str | None,
    older_than: _dt.datetime | None,
) -> dict[str, Any]:
    """Dead events matching every filter given (``ids`` of any BSON type)."""
    query: dict[str, Any] = {"status": STATUS_DEAD}
    if ids is not None:
        query["_id"] = {"$in": list(ids)}
    if event_type is not None:
        query["type"] = event_type
    if key is not None:
        query["key"] = key
    if older_than is not None:
        query["created_at"] = {"$lt": older_than}
    return query


def _typed(value: object, kind: type[_T]) -> _T | None:
    return value if isinstance(value, kind) else None
