"""MongoDB access shared by the relay and the CLI: indexes, outbox queries, relay state."""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bson import ObjectId, Timestamp
from pymongo import ASCENDING, MongoClient, ReadPreference, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import CollectionInvalid, OperationFailure
from pymongo.read_concern import ReadConcern

from ._event import STATUS_DEAD, STATUS_PENDING, STATUS_PUBLISHED
from ._event import utcnow as _utcnow

__all__ = ["Failure", "OutboxStore", "ensure_indexes", "state_collection_name"]

PENDING_INDEX = "status_1__id_1"
# Fields the relay needs to publish an event; bookkeeping fields stay on the server.
PUBLISH_PROJECTION = {
    "type": 1,
    "topic": 1,
    "key": 1,
    "payload": 1,
    "attributes": 1,
    "created_at": 1,
    "attempts": 1,
    "next_attempt_at": 1,
}
# Codes that say a snapshot read is not possible here: SnapshotUnavailable, SnapshotTooOld,
# InvalidOptions, TypeMismatch, FailedToParse, OperationNotSupportedInTransaction.
_SNAPSHOT_UNUSABLE = {246, 239, 72, 14, 9, 263}


def state_collection_name(collection: str) -> str:
    """Name of the relay state collection that belongs to an outbox collection."""
    return f"{collection}_relay_state"


def ensure_indexes(
    client: MongoClient[Any] | Database[Any],
    database: str | None = None,
    collection: str = "outbox",
) -> None:
    """Create the outbox and relay state collections and the indexes the relay relies on.

    Idempotent. Collections are created up front because a transaction on an older server
    cannot create one. Takes a :class:`pymongo.MongoClient` with ``database`` or a Database.
    """
    db = client if isinstance(client, Database) else client[_require(database)]
    for name in (collection, state_collection_name(collection)):
        try:
            db.create_collection(name)
        except CollectionInvalid:
            pass
        except OperationFailure as exc:
            if exc.code != 48:  # NamespaceExists
                raise
    db[collection].create_index([("status", ASCENDING), ("_id", ASCENDING)], name=PENDING_INDEX)


def _require(database: str | None) -> str:
    if not database:
        raise ValueError("database is required when a client is given")
    return database


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed publish attempt to record on an outbox document."""

    event_id: ObjectId
    attempts: int
    error: str
    next_attempt_at: _dt.datetime | None  # None: the event is dead


class OutboxStore:
    """Queries and updates on one outbox collection and its relay state."""

    def __init__(self, db: Database[Any], collection: str = "outbox") -> None:
        self.db = db
        self.outbox: Collection[Any] = db[collection]
        self.state: Collection[Any] = db[state_collection_name(collection)]

    # -- outbox ----------------------------------------------------------------------------

    def mark_published(self, ids: list[ObjectId], at: _dt.datetime) -> None:
        """Mark events published (one update for the whole batch)."""
        if ids:
            self.outbox.update_many(
                {"_id": {"$in": ids}, "status": STATUS_PENDING},
                {
                    "$set": {"status": STATUS_PUBLISHED, "published_at": at},
                    "$inc": {"attempts": 1},
                },
            )

    def record_failures(self, failures: Iterable[Failure]) -> None:
        """Record failed attempts; those without a next attempt become dead."""
        ops = []
        for f in failures:
            update: dict[str, Any] = {"attempts": f.attempts, "last_error": f.error[:2000]}
            if f.next_attempt_at is None:
                update["status"] = STATUS_DEAD
            else:
                update["next_attempt_at"] = f.next_attempt_at
            ops.append(UpdateOne({"_id": f.event_id, "status": STATUS_PENDING}, {"$set": update}))
        if ops:
            self.outbox.bulk_write(ops, ordered=False)

    def pending_batches(
        self, batch_size: int, at: Timestamp | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Pending events in ``_id`` order, in lists of up to ``batch_size``.

        Read at cluster time ``at`` when given: a snapshot read at the time the change stream
        starts makes the sweep and the stream meet without a gap or an order inversion;
        servers that cannot do it get a plain read.
        """
        query = {"status": STATUS_PENDING}
        if at is not None:
            try:
                yield from self._snapshot_find(query, batch_size, at)
                return
            except _SnapshotUnavailable:
                pass
        if at is None:
            yield from _batches(
                self.outbox.find(
                    query, PUBLISH_PROJECTION, sort=[("_id", ASCENDING)], batch_size=batch_size
                ),
                batch_size,
            )
            return
        # Without snapshot reads (servers before 5.0): a majority read from the primary that
        # waits for ``at``, so nothing committed at or before ``at`` is missed.
        outbox = self.outbox.with_options(
            read_concern=ReadConcern("majority"), read_preference=ReadPreference.PRIMARY
        )
        with self.db.client.start_session(causal_consistency=True) as session:
            session.advance_operation_time(at)
            cursor = outbox.find(
                query,
                PUBLISH_PROJECTION,
                sort=[("_id", ASCENDING)],
                batch_size=batch_size,
                session=session,
            )
            yield from _batches(cursor, batch_size)

    def _snapshot_find(
        self, query: Mapping[str, Any], batch_size: int, at: Timestamp
    ) -> Iterator[list[dict[str, Any]]]:
        cmd = {
            "find": self.outbox.name,
            "filter": query,
            "projection": PUBLISH_PROJECTION,
            "sort": {"_id": 1},
            "hint": PENDING_INDEX,
            "batchSize": batch_size,
            "readConcern": {"level": "snapshot", "atClusterTime": at},
        }
        # A cursor belongs to the session that opened it: every getMore must use the same one.
        with self.db.client.start_session(causal_consistency=False) as session:
            try:
                reply = self.db.command(cmd, session=session)
            except OperationFailure as exc:
                if exc.code in _SNAPSHOT_UNUSABLE or exc.code == 2:  # BadValue: no index...
                    raise _SnapshotUnavailable from exc
                raise
            cursor = reply["cursor"]
            if cursor["firstBatch"]:
                yield cursor["firstBatch"]
            cursor_id = cursor["id"]
            get_more = {
                "getMore": cursor_id,
                "collection": self.outbox.name,
                "batchSize": batch_size,
            }
            try:
                while cursor_id:
                    reply = self.db.command(get_more, session=session)
                    cursor = reply["cursor"]
                    cursor_id = cursor["id"]
                    if cursor["nextBatch"]:
                        yield cursor["nextBatch"]
            finally:
                if cursor_id:
                    with contextlib.suppress(Exception):
                        self.db.command(
                            {"killCursors": self.outbox.name, "cursors": [cursor_id]},
                            session=session,
                        )

    def dead_keys(self) -> list[tuple[str | None, str]]:
        """(topic, ordering key) pairs that have a dead event."""
        rows = self.outbox.aggregate(
            [
                {"$match": {"status": STATUS_DEAD, "key": {"$type": "string"}}},
                {"$group": {"_id": {"t": "$topic", "k": "$key"}}},
            ]
        )
        return [(r["_id"].get("t"), str(r["_id"]["k"])) for r in rows]

    def requeue(
        self,
        *,
        ids: Iterable[ObjectId] | None = None,
        event_type: str | None = None,
        key: str | None = None,
        older_than: _dt.datetime | None = None,
    ) -> int:
        """Set dead events back to pending (all, or those matching every filter given).

        Attempts start again from zero; ``last_error`` is kept for the record. Returns how
        many events were requeued.
        """
        query: dict[str, Any] = {"status": STATUS_DEAD}
        if ids is not None:
            query["_id"] = {"$in": list(ids)}
        if event_type is not None:
            query["type"] = event_type
        if key is not None:
            query["key"] = key
        if older_than is not None:
            query["created_at"] = {"$lt": older_than}
        result = self.outbox.update_many(
            query,
            {
                "$set": {"status": STATUS_PENDING, "attempts": 0, "requeued_at": _utcnow()},
                "$unset": {"next_attempt_at": ""},
            },
        )
        return int(result.modified_count)

    def counts(self) -> dict[str, int]:
        """Number of events per status."""
        result = {STATUS_PENDING: 0, STATUS_PUBLISHED: 0, STATUS_DEAD: 0}
        for row in self.outbox.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}]):
            result[str(row["_id"])] = int(row["n"])
        return result

    def oldest_pending(self) -> dict[str, Any] | None:
        """The first pending event in ``_id`` order, if any."""
        doc: dict[str, Any] | None = self.outbox.find_one(
            {"status": STATUS_PENDING}, {"created_at": 1}, sort=[("_id", ASCENDING)]
        )
        return doc

    def newest_errors(self, limit: int = 5) -> list[dict[str, Any]]:
        """The most recent dead events with their reasons."""
        return list(
            self.outbox.find(
                {"status": STATUS_DEAD},
                {"type": 1, "key": 1, "attempts": 1, "last_error": 1},
                sort=[("_id", -1)],
                limit=limit,
            )
        )

    # -- relay state -----------------------------------------------------------------------

    def load_state(self, name: str) -> dict[str, Any]:
        """The state document of relay ``name`` (empty if it never checkpointed)."""
        doc: dict[str, Any] | None = self.state.find_one({"_id": name})
        return doc or {}

    def save_token(
        self,
        name: str,
        token: Mapping[str, Any] | None,
        at: _dt.datetime,
        fence: Mapping[str, Any] | None = None,
    ) -> bool:
        """Persist the resume token of relay ``name``; False if the ``fence`` filter failed.

        ``fence`` (from the relay's lease) makes the write conditional on still holding the
        lease, so a relay that lost it cannot move the checkpoint of its successor.
        """
        if fence is None:
            self.state.update_one(
                {"_id": name}, {"$set": {"resume_token": token, "checkpoint_at": at}}, upsert=True
            )
            return True
        result = self.state.update_one(
            fence, {"$set": {"resume_token": token, "checkpoint_at": at}}
        )
        return result.matched_count == 1

    def reset_token(self, name: str) -> bool:
        """Forget the resume token so the next start runs the gap-free recovery."""
        result = self.state.update_one({"_id": name}, {"$unset": {"resume_token": ""}})
        return bool(result.modified_count)


def _batches(docs: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _SnapshotUnavailable(Exception):
    pass
