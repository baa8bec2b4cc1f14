"""MongoDB access shared by the relay and the CLI: indexes, outbox queries, relay state."""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import bson
import bson.errors
from bson import ObjectId, Timestamp
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, MongoClient, ReadPreference, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure
from pymongo.read_concern import ReadConcern

from ._document import STATUS_DEAD, STATUS_PENDING, STATUS_PUBLISHED
from ._errors import ConfigurationError
from ._mongo_errors import create_collection
from ._partition import Partition, slot_for
from ._retention import set_retention

__all__ = [
    "RAW",
    "SLOT_INDEX",
    "Failure",
    "OutboxStore",
    "assign_missing_slots",
    "count_by_status",
    "ensure_indexes",
    "find_one_lenient",
    "lenient",
    "oldest_pending",
    "raw_batches",
    "state_collection_name",
    "sweep_position",
]

PENDING_INDEX = "status_1__id_1"
#: Serves the sweeps of a relay group's partitions (ranges of slots, ``_id`` order per slot).
SLOT_INDEX = "status_1_slot_1__id_1"
_WHOLE = Partition()
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
    "trace": 1,
    "slot": 1,
    "content_type": 1,
}
# Codes that say a snapshot read is not possible here: SnapshotUnavailable, SnapshotTooOld,
# InvalidOptions, TypeMismatch, FailedToParse, OperationNotSupportedInTransaction.
_SNAPSHOT_UNUSABLE = {246, 239, 72, 14, 9, 263}
#: Codec options that leave documents undecoded (the relay decodes them one by one).
RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
_ID_ONLY: CodecOptions[dict[str, Any]] = CodecOptions(unicode_decode_error_handler="replace")


def state_collection_name(collection: str) -> str:
    """Name of the relay state collection that belongs to an outbox collection."""
    return f"{collection}_relay_state"


def ensure_indexes(
    client: MongoClient[Any] | Database[Any],
    database: str | None = None,
    collection: str = "outbox",
    *,
    partitions: int = 1,
    retention: _dt.timedelta | float | Literal["off"] | None = None,
    inbox: str = "inbox",
) -> None:
    """Create the outbox and relay state collections and the indexes the relay relies on.

    Idempotent. Collections are created up front because a transaction on an older server
    cannot create one. Takes a :class:`pymongo.MongoClient` with ``database`` or a Database.
    With ``partitions`` above 1 (a relay group), also the index of the partitions' sweeps,
    and pending events written before slots existed get theirs.

    ``retention`` (a :class:`~datetime.timedelta` or seconds) keeps a TTL index that deletes
    published events that long after ``published_at`` (pending and dead events stay), and inbox
    records that long after ``processed_at`` when the ``inbox`` collection exists; ``"off"``
    removes both indexes; None (the default) leaves them as they are.
    """
    db = client if isinstance(client, Database) else client[_require(database)]
    for name in (collection, state_collection_name(collection)):
        create_collection(db, name)
    db[collection].create_index([("status", ASCENDING), ("_id", ASCENDING)], name=PENDING_INDEX)
    if partitions > 1:
        ensure_slot_index(db[collection])  # first: it serves the search for slotless events
        assign_missing_slots(db[collection])
    if retention is not None:
        ttl = None if retention == "off" else retention
        set_retention(db[collection], "published_at", ttl)
        if inbox in db.list_collection_names(filter={"name": inbox}):
            set_retention(db[inbox], "processed_at", ttl)


def count_by_status(
    outbox: Collection[Any],
    statuses: Iterable[str] = (STATUS_PENDING, STATUS_PUBLISHED, STATUS_DEAD),
) -> dict[str, int]:
    """Number of events in each of ``statuses`` (counted on the status index)."""
    return {status: outbox.count_documents({"status": status}) for status in statuses}


def oldest_pending(outbox: Collection[Any]) -> dict[str, Any] | None:
    """The first pending event in ``_id`` order (its ``created_at`` only), if any."""
    doc: dict[str, Any] | None = outbox.find_one(
        {"status": STATUS_PENDING}, {"created_at": 1}, sort=[("_id", ASCENDING)]
    )
    return doc


def assign_missing_slots(outbox: Collection[Any], batch: int = 1000) -> int:
    """Give pending events written without ``slot`` (before slots existed) the slot ``emit``
    gives now, so that a relay group publishes each of their keys from one partition; return
    how many were given one. Documents whose ``_id`` is no ObjectId are left to partition 0
    (the relay sets them dead)."""
    ops: list[UpdateOne] = []
    done = 0
    query = {"status": STATUS_PENDING, "slot": {"$exists": False}}
    for doc in lenient(outbox).find(query, {"key": 1}, batch_size=batch):
        event_id, key = doc["_id"], doc.get("key")
        if not isinstance(event_id, ObjectId):
            continue
        slot = slot_for(key if isinstance(key, str) and key else None, event_id)
        ops.append(
            UpdateOne({"_id": event_id, "slot": {"$exists": False}}, {"$set": {"slot": slot}})
        )
        if len(ops) >= batch:
            done += outbox.bulk_write(ops, ordered=False).modified_count
            ops = []
    if ops:
        done += outbox.bulk_write(ops, ordered=False).modified_count
    return done


def ensure_slot_index(outbox: Collection[Any]) -> None:
    """Create the index a relay group's partition sweeps read (idempotent)."""
    outbox.create_index(
        [("status", ASCENDING), ("slot", ASCENDING), ("_id", ASCENDING)], name=SLOT_INDEX
    )


def _require(database: str | None) -> str:
    if not database:
        raise ConfigurationError("database is required when a client is given")
    return database


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed publish attempt to record on an outbox document."""

    event_id: Any  # an ObjectId, or whatever _id a poison document has
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
        self,
        batch_size: int,
        at: Timestamp | None = None,
        after: Any = None,
        partition: Partition = _WHOLE,
    ) -> Iterator[list[RawBSONDocument]]:
        """Pending events of ``partition`` in lists of up to ``batch_size`` raw documents (the
        relay decodes each on its own), starting after position ``after`` if given.

        The whole outbox is read in ``_id`` order and a position is an ``_id``; a partition of
        a group is read in (``slot``, ``_id``) order, which keeps each key's order, and a
        position is a (slot, _id) pair (see :func:`sweep_position`).

        Read at cluster time ``at`` when given: a snapshot read at the time the change stream
        starts makes the sweep and the stream meet without a gap or an order inversion;
        servers that cannot do it get a plain read. A snapshot that becomes too old while it is
        read raises ``OperationFailure`` code 239 (SnapshotTooOld).
        """
        query: dict[str, Any] = {"status": STATUS_PENDING, **partition.match()}
        order = _order(partition)
        # An index bound rather than {"_id": {"$gt": after}}: $gt only matches _ids of the
        # same BSON type, the index orders them all. The bound is inclusive: skip ``after``.
        bounds: dict[str, Any] = {}
        if after is not None:
            bound = (STATUS_PENDING, *after) if not partition.whole else (STATUS_PENDING, after)
            bounds = {"min": dict(zip(order.fields, bound, strict=True))}
        first_id = after if partition.whole or after is None else after[-1]
        # A snapshot read is hinted (a missing index makes it fall back to a plain read); a
        # plain read only where a bound needs the index.
        hint = order.index if bounds or partition.whole else None
        outbox = self.outbox.with_options(codec_options=RAW)
        if at is not None:
            try:
                found = self._snapshot_find(query, batch_size, at, bounds, order, hint)
                yield from _skip_first(found, first_id)
                return
            except _SnapshotUnavailable:
                pass
        cursor_options: dict[str, Any] = {"sort": order.sort, "batch_size": batch_size}
        if bounds:
            cursor_options.update(hint=order.index, **bounds)
        if at is None:
            cursor = outbox.find(query, PUBLISH_PROJECTION, **cursor_options)
            yield from _skip_first(raw_batches(cursor, batch_size), first_id)
            return
        # Without snapshot reads (servers before 5.0): a majority read from the primary that
        # waits for ``at``, so nothing committed at or before ``at`` is missed.
        outbox = outbox.with_options(
            read_concern=ReadConcern("majority"), read_preference=ReadPreference.PRIMARY
        )
        with self.db.client.start_session(causal_consistency=True) as session:
            session.advance_operation_time(at)
            cursor = outbox.find(query, PUBLISH_PROJECTION, session=session, **cursor_options)
            yield from _skip_first(raw_batches(cursor, batch_size), first_id)

    def _snapshot_find(
        self,
        query: Mapping[str, Any],
        batch_size: int,
        at: Timestamp,
        bounds: Mapping[str, Any],
        order: _Order,
        hint: str | None,
    ) -> Iterator[list[RawBSONDocument]]:
        cmd: dict[str, Any] = {
            "find": self.outbox.name,
            "filter": query,
            "projection": PUBLISH_PROJECTION,
            "sort": dict(order.sort),
            "batchSize": batch_size,
            "readConcern": {"level": "snapshot", "atClusterTime": at},
            **bounds,
        }
        if hint is not None:
            cmd["hint"] = hint
        # A cursor belongs to the session that opened it: every getMore must use the same one.
        with self.db.client.start_session(causal_consistency=False) as session:
            try:
                reply = self.db.command(cmd, session=session, codec_options=RAW)
            except OperationFailure as exc:
                if exc.code in _SNAPSHOT_UNUSABLE or exc.code == 2:  # BadValue: no index...
                    raise _SnapshotUnavailable from exc
                raise
            cursor = reply["cursor"]
            if cursor["firstBatch"]:
                yield list(cursor["firstBatch"])
            cursor_id = cursor["id"]
            get_more = {
                "getMore": cursor_id,
                "collection": self.outbox.name,
                "batchSize": batch_size,
            }
            try:
                while cursor_id:
                    reply = self.db.command(get_more, session=session, codec_options=RAW)
                    cursor = reply["cursor"]
                    cursor_id = cursor["id"]
                    if cursor["nextBatch"]:
                        yield list(cursor["nextBatch"])
            finally:
                if cursor_id:
                    with contextlib.suppress(Exception):
                        self.db.command(
                            {"killCursors": self.outbox.name, "cursors": [cursor_id]},
                            session=session,
                        )

    def cluster_time(self) -> Timestamp:
        """The cluster time as the server sees it now."""
        with self.db.client.start_session(causal_consistency=False) as session:
            self.db.command("ping", session=session)
            at: Timestamp | None = session.operation_time
        if at is None:
            raise ConfigurationError("the server reports no cluster time: is it a replica set?")
        return at

    def dead_keys(self) -> list[tuple[str | None, str]]:
        """(topic, ordering key) pairs that have a dead event.

        A pair that cannot be decoded (invalid UTF-8) is left out: no publishable event can
        have it, so it holds nothing back.
        """
        pipeline: list[dict[str, Any]] = [
            {"$match": {"status": STATUS_DEAD, "key": {"$type": "string"}}},
            {"$group": {"_id": {"t": "$topic", "k": "$key"}}},
        ]
        try:
            rows = list(self.outbox.aggregate(pipeline))
        except bson.errors.InvalidBSON:
            rows = []
            for raw in self.outbox.with_options(codec_options=RAW).aggregate(pipeline):
                try:
                    rows.append(bson.decode(raw.raw))
                except bson.errors.InvalidBSON:
                    continue
        return [(r["_id"].get("t"), str(r["_id"]["k"])) for r in rows]

    # -- relay state -----------------------------------------------------------------------

    def load_state(self, name: str) -> dict[str, Any]:
        """The state document of relay ``name`` (empty if it never checkpointed).

        Strings that are not valid UTF-8 (written by hand or by another driver) are read with
        replacement characters rather than failing.
        """
        return find_one_lenient(self.state, {"_id": name}) or {}

    def load_token(self, name: str) -> Mapping[str, Any] | None:
        """The saved resume token of relay ``name``; None if absent or not a usable document."""
        doc = find_one_lenient(self.state, {"_id": name}, {"resume_token": 1}, strict_only=True)
        token = (doc or {}).get("resume_token")
        return token if isinstance(token, Mapping) else None

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


def find_one_lenient(
    collection: Collection[Any],
    query: Mapping[str, Any],
    projection: Mapping[str, Any] | None = None,
    *,
    strict_only: bool = False,
) -> dict[str, Any] | None:
    """``find_one``, reading strings that are not valid UTF-8 with replacement characters (or,
    with ``strict_only``, returning None for such a document)."""
    try:
        doc: dict[str, Any] | None = collection.find_one(query, projection)
        return doc
    except bson.errors.InvalidBSON:
        if strict_only:
            return None
    doc = lenient(collection).find_one(query, projection)
    return doc


def lenient(collection: Collection[Any]) -> Collection[Any]:
    """``collection``, reading strings that are not valid UTF-8 with replacement characters."""
    options = collection.codec_options.with_options(unicode_decode_error_handler="replace")
    return collection.with_options(codec_options=options)


#: Bytes of raw documents per list when the server's batches are not used as they come (as a
#: getMore reply, at most 16 MiB).
_BATCH_BYTES = 16 * 1024 * 1024


def raw_batches(docs: Iterable[RawBSONDocument], size: int) -> Iterator[list[RawBSONDocument]]:
    """``docs`` in lists of at most ``size`` documents and about 16 MiB (at least one each)."""
    batch: list[RawBSONDocument] = []
    held = 0
    for doc in docs:
        batch.append(doc)
        held += len(doc.raw)
        if len(batch) >= size or held >= _BATCH_BYTES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _skip_first(
    batches: Iterator[list[RawBSONDocument]], after: Any
) -> Iterator[list[RawBSONDocument]]:
    """``batches`` without a leading document whose ``_id`` is ``after`` (an inclusive bound)."""
    if after is None:
        yield from batches
        return
    first = True
    for batch in batches:
        if first and batch:
            first = False
            head = bson.decode(batch[0].raw, _ID_ONLY)
            if head.get("_id") == after and type(head.get("_id")) is type(after):
                batch = batch[1:]
        if batch:
            yield batch


class _SnapshotUnavailable(Exception):
    pass


@dataclass(frozen=True)
class _Order:
    index: str
    fields: tuple[str, ...]  # of the index, status first

    @property
    def sort(self) -> list[tuple[str, int]]:
        return [(f, ASCENDING) for f in self.fields[1:]]


_BY_ID = _Order(PENDING_INDEX, ("status", "_id"))
_BY_SLOT = _Order(SLOT_INDEX, ("status", "slot", "_id"))


def _order(partition: Partition) -> _Order:
    return _BY_ID if partition.whole else _BY_SLOT


def sweep_position(partition: Partition, doc: Mapping[str, Any]) -> Any:
    """Where a sweep of ``partition`` resumes after the (decoded) document ``doc``."""
    if partition.whole:
        return doc["_id"]
    return (doc.get("slot"), doc["_id"])
