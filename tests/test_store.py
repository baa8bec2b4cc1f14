"""Unit tests of ``OutboxStore`` and ``OutboxAdmin`` queries and updates on mongomock.

mongomock has neither sessions nor change streams nor snapshot reads: ``pending(at=...)``,
transactions and the relay are covered by the integration tests on a real replica set.
"""

from __future__ import annotations

import datetime as dt

import bson
import mongomock
import pytest
from bson import ObjectId

from mongo_outbox import ConfigurationError
from mongo_outbox._admin import OutboxAdmin
from mongo_outbox._document import build_document
from mongo_outbox._message import message_from_document
from mongo_outbox._store import (
    PENDING_INDEX,
    PUBLISH_PROJECTION,
    Failure,
    OutboxStore,
    ensure_indexes,
    state_collection_name,
)

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 123000)  # naive UTC, millisecond precision (as BSON)


def _at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture(autouse=True)
def _mongomock_bulk_sort_shim(monkeypatch):
    """mongomock 4.3 predates PyMongo 4.11, whose ``UpdateOne`` passes ``sort=`` to the bulk
    builder; drop it (always None here) so ``bulk_write`` works on mongomock."""
    builder = mongomock.collection.BulkOperationBuilder
    original = builder.add_update
    if "sort" in original.__code__.co_varnames:
        return

    def add_update(self, *args, sort=None, **kwargs):
        assert sort is None
        return original(self, *args, **kwargs)

    monkeypatch.setattr(builder, "add_update", add_update)


@pytest.fixture
def db():
    client = mongomock.MongoClient()
    try:
        yield client["shop"]
    finally:
        client.close()


@pytest.fixture
def store(db):
    return OutboxStore(db)


@pytest.fixture
def admin(db):
    return OutboxAdmin(db)


def _event(n: int, *, status: str = "pending", key: str | None = None, **extra):
    doc = build_document(
        f"Event{n}",
        {"n": n},
        topic="orders",
        key=key,
        attributes={"n": str(n)},
        event_id=ObjectId(f"{n:024x}"),
        created_at=_at(n),
    )
    doc["status"] = status
    doc.update(extra)
    return doc


def _get(store, n: int):
    return store.outbox.find_one({"_id": ObjectId(f"{n:024x}")})


def test_collections_are_named_after_the_outbox(db):
    assert state_collection_name("outbox") == "outbox_relay_state"
    store = OutboxStore(db, "events")
    assert store.outbox.name == "events"
    assert store.state.name == "events_relay_state"
    assert OutboxStore(db).outbox.name == "outbox"


def test_ensure_indexes_creates_collections_and_index_idempotently(db):
    # A mongomock Database is not a pymongo Database: pass the client and the name.
    ensure_indexes(db.client, "shop")
    ensure_indexes(db.client, "shop")  # again: no error
    assert {"outbox", "outbox_relay_state"} <= set(db.list_collection_names())
    info = db.outbox.index_information()
    assert info[PENDING_INDEX]["key"] == [("status", 1), ("_id", 1)]


def test_ensure_indexes_with_a_client_needs_a_database():
    client = mongomock.MongoClient()
    with pytest.raises(ConfigurationError, match="database is required"):
        ensure_indexes(client)
    ensure_indexes(client, "shop", "events")
    assert {"events", "events_relay_state"} <= set(client.shop.list_collection_names())


# -- pending ---------------------------------------------------------------------------------


def test_pending_returns_only_pending_in_id_order(real_store):
    store = real_store
    # Inserted out of order: the result must follow _id, not insertion order.
    store.outbox.insert_many(
        [
            _event(5),
            _event(2, status="published", published_at=_at(9)),
            _event(1),
            _event(4, status="dead", last_error="boom"),
            _event(3, attempts=2, last_error="refused", next_attempt_at=_at(100)),
        ]
    )
    docs = _pending(store, 2)
    assert [d["_id"] for d in docs] == [ObjectId(f"{n:024x}") for n in (1, 3, 5)]


@pytest.fixture
def real_store(client, db_name):
    """A store on the real replica set: the relay reads pending events as raw BSON, which
    mongomock cannot return."""
    return OutboxStore(client[db_name])


def _pending(store, batch_size):
    return [bson.decode(doc.raw) for batch in store.pending_batches(batch_size) for doc in batch]


def test_pending_projects_only_what_publishing_needs(real_store):
    store = real_store
    store.outbox.insert_one(
        _event(1, key="k", attempts=2, last_error="refused", next_attempt_at=_at(100))
    )
    (doc,) = _pending(store, 10)
    # Every field publishing needs; ``trace`` is there only for events emitted in a span.
    assert set(doc) == {"_id", *PUBLISH_PROJECTION} - {"trace"}
    assert "status" not in doc
    assert "last_error" not in doc
    assert doc["payload"] == b'{"n":1}'
    assert doc["type"] == "Event1"
    assert doc["key"] == "k"
    assert doc["attributes"] == {"n": "1"}
    assert doc["attempts"] == 2
    assert doc["next_attempt_at"] == _at(100)
    # Enough to build the message it will publish.
    message = message_from_document(doc)
    assert message.attributes["outbox_event_type"] == "Event1"


def test_pending_on_an_empty_outbox(real_store):
    store = real_store
    assert _pending(store, 100) == []


# -- mark_published --------------------------------------------------------------------------


def test_mark_published_sets_status_time_and_counts_the_attempt(store):
    store.outbox.insert_many([_event(1), _event(2, attempts=3), _event(3)])
    store.mark_published([ObjectId(f"{1:024x}"), ObjectId(f"{2:024x}")], _at(60))
    one, two, three = _get(store, 1), _get(store, 2), _get(store, 3)
    assert one["status"] == "published"
    assert one["published_at"] == _at(60)
    assert one["attempts"] == 1
    assert two["status"] == "published"
    assert two["attempts"] == 4
    assert three["status"] == "pending"
    assert "published_at" not in three
    assert three["attempts"] == 0


def test_mark_published_ignores_documents_that_are_not_pending(store):
    store.outbox.insert_many(
        [
            _event(1, status="dead", attempts=10),
            _event(2, status="published", attempts=1, published_at=_at(5)),
        ]
    )
    store.mark_published([ObjectId(f"{1:024x}"), ObjectId(f"{2:024x}")], _at(60))
    dead, published = _get(store, 1), _get(store, 2)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 10
    assert "published_at" not in dead
    assert published["attempts"] == 1
    assert published["published_at"] == _at(5)


def test_mark_published_with_no_ids_does_nothing(store):
    store.outbox.insert_one(_event(1))
    store.mark_published([], _at(60))
    assert _get(store, 1)["status"] == "pending"


# -- record_failures -------------------------------------------------------------------------


def test_record_failures_schedules_the_next_attempt_or_kills(store):
    store.outbox.insert_many([_event(1), _event(2, attempts=9), _event(3)])
    store.record_failures(
        [
            Failure(ObjectId(f"{1:024x}"), 1, "topic refused", _at(30)),
            Failure(ObjectId(f"{2:024x}"), 10, "still refused", None),
        ]
    )
    retry, dead, untouched = _get(store, 1), _get(store, 2), _get(store, 3)
    assert retry["status"] == "pending"
    assert retry["attempts"] == 1
    assert retry["last_error"] == "topic refused"
    assert retry["next_attempt_at"] == _at(30)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 10
    assert dead["last_error"] == "still refused"
    assert "next_attempt_at" not in dead
    assert untouched["attempts"] == 0
    assert "last_error" not in untouched


def test_record_failures_truncates_long_errors(store):
    store.outbox.insert_one(_event(1))
    store.record_failures([Failure(ObjectId(f"{1:024x}"), 1, "x" * 5000, _at(1))])
    assert _get(store, 1)["last_error"] == "x" * 2000


def test_record_failures_ignores_documents_that_are_not_pending(store):
    store.outbox.insert_one(_event(1, status="published", attempts=1))
    store.record_failures([Failure(ObjectId(f"{1:024x}"), 7, "late", None)])
    doc = _get(store, 1)
    assert doc["status"] == "published"
    assert doc["attempts"] == 1
    assert "last_error" not in doc


def test_record_failures_with_nothing_does_nothing(store):
    store.record_failures([])
    store.record_failures(iter(()))
    assert store.outbox.count_documents({}) == 0


# -- OutboxAdmin: counts, oldest_pending, newest_errors ------------------------------------


def test_counts(admin):
    assert admin.counts() == {"pending": 0, "published": 0, "dead": 0}
    admin.outbox.insert_many(
        [
            _event(1),
            _event(2),
            _event(3, status="published"),
            _event(4, status="dead"),
            _event(5),
        ]
    )
    assert admin.counts() == {"pending": 3, "published": 1, "dead": 1}


def test_oldest_pending(admin):
    assert admin.oldest_pending() is None
    admin.outbox.insert_many([_event(3), _event(1, status="published"), _event(2)])
    oldest = admin.oldest_pending()
    assert oldest == {"_id": ObjectId(f"{2:024x}"), "created_at": _at(2)}


def test_newest_errors(admin):
    assert admin.newest_errors() == []
    admin.outbox.insert_many(
        [
            _event(n, status="dead", key=f"k{n}", attempts=10, last_error=f"e{n}")
            for n in range(1, 8)
        ]
        + [_event(8, last_error="pending error"), _event(9, status="published")]
    )
    errors = admin.newest_errors()
    assert [e["_id"] for e in errors] == [ObjectId(f"{n:024x}") for n in (7, 6, 5, 4, 3)]
    assert errors[0] == {
        "_id": ObjectId(f"{7:024x}"),
        "type": "Event7",
        "key": "k7",
        "attempts": 10,
        "last_error": "e7",
    }
    assert [e["_id"] for e in admin.newest_errors(limit=2)] == [
        ObjectId(f"{7:024x}"),
        ObjectId(f"{6:024x}"),
    ]


# -- relay state -----------------------------------------------------------------------------


def test_load_state_of_an_unknown_relay_is_empty(store):
    assert store.load_state("default") == {}


def test_save_token_and_load_state(store):
    token = {"_data": "8265F0000000000001"}
    store.save_token("default", token, _at(1))
    state = store.load_state("default")
    assert state["_id"] == "default"
    assert state["resume_token"] == token
    assert state["checkpoint_at"] == _at(1)
    newer = {"_data": "8265F0000000000002"}
    store.save_token("default", newer, _at(2))
    state = store.load_state("default")
    assert state["resume_token"] == newer
    assert state["checkpoint_at"] == _at(2)
    assert store.state.count_documents({}) == 1
    assert store.load_state("other") == {}


def test_save_token_keeps_other_state_fields(store):
    store.state.insert_one({"_id": "default", "lease_owner": "host-1", "fence": 3})
    store.save_token("default", {"_data": "01"}, _at(1))
    state = store.load_state("default")
    assert state["lease_owner"] == "host-1"
    assert state["fence"] == 3
    assert state["resume_token"] == {"_data": "01"}


def test_reset_token(store, admin):
    store.save_token("default", {"_data": "01"}, _at(1))
    store.save_token("other", {"_data": "02"}, _at(1))
    assert admin.reset_token("default") is True
    state = store.load_state("default")
    assert "resume_token" not in state
    assert state["checkpoint_at"] == _at(1)
    assert store.load_state("other")["resume_token"] == {"_data": "02"}
    assert admin.reset_token("default") is False  # nothing left to reset


def test_reset_token_of_an_unknown_relay_creates_nothing(admin):
    assert admin.reset_token("ghost") is False
    assert admin.state.count_documents({}) == 0


def test_save_token_with_a_fence_writes_only_while_it_matches(store):
    store.state.insert_one({"_id": "default", "lease_owner": "me", "fence": 4})
    fence = {"_id": "default", "fence": 4}
    assert store.save_token("default", {"_data": "01"}, _at(1), fence=fence) is True
    assert store.load_state("default")["resume_token"] == {"_data": "01"}
    stale = {"_id": "default", "fence": 3}
    assert store.save_token("default", {"_data": "02"}, _at(2), fence=stale) is False
    state = store.load_state("default")
    assert state["resume_token"] == {"_data": "01"}
    assert state["checkpoint_at"] == _at(1)
    # A fenced write never creates the state document.
    assert store.save_token("ghost", {"_data": "03"}, _at(3), fence={"_id": "ghost"}) is False
    assert store.load_state("ghost") == {}


# -- dead events -----------------------------------------------------------------------------


def _dead(n: int, **extra):
    fields = {"attempts": 10, "last_error": f"e{n}", "next_attempt_at": _at(99)}
    fields.update(extra)
    return _event(n, status="dead", **fields)


def test_dead_keys(store):
    assert store.dead_keys() == []
    store.outbox.insert_many(
        [_dead(1, key="a"), _dead(2, key="a"), _dead(3, key="b"), _dead(4), _event(5, key="c")]
    )
    assert sorted(store.dead_keys()) == [("orders", "a"), ("orders", "b")]


def test_requeue_all_dead_events(store, admin):
    store.outbox.insert_many([_dead(1), _dead(2), _event(3), _event(4, status="published")])
    assert admin.requeue() == 2
    for n in (1, 2):
        doc = _get(store, n)
        assert doc["status"] == "pending"
        assert doc["attempts"] == 0
        assert "next_attempt_at" not in doc
        assert doc["last_error"] == f"e{n}"  # kept for the record
        assert isinstance(doc["requeued_at"], dt.datetime)
    assert _get(store, 4)["status"] == "published"
    assert "requeued_at" not in _get(store, 3)
    assert admin.requeue() == 0


def test_requeue_filters_must_all_match(store, admin):
    store.outbox.insert_many(
        [_dead(1, key="a"), _dead(2, key="a"), _dead(3, key="b"), _dead(4, key="a")]
    )
    assert admin.requeue(key="a", event_type="Event2") == 1
    assert _get(store, 2)["status"] == "pending"
    assert admin.requeue(ids=[ObjectId(f"{3:024x}"), ObjectId(f"{1:024x}")], key="b") == 1
    assert _get(store, 3)["status"] == "pending"
    assert _get(store, 1)["status"] == "dead"
    # created_at of event n is T0 + n seconds.
    assert admin.requeue(older_than=_at(2)) == 1
    assert _get(store, 1)["status"] == "pending"
    assert _get(store, 4)["status"] == "dead"
    assert admin.counts() == {"pending": 3, "published": 0, "dead": 1}


def test_requeue_ids_of_any_type(store, admin):
    store.outbox.insert_many(
        [{**_dead(1), "_id": "abc"}, {**_dead(2), "_id": 42}, _dead(3), {**_dead(4), "_id": "42"}]
    )
    assert admin.requeue(ids=["abc", 42]) == 2
    assert store.outbox.find_one({"_id": "abc"})["status"] == "pending"
    assert store.outbox.find_one({"_id": 42})["status"] == "pending"
    assert store.outbox.find_one({"_id": "42"})["status"] == "dead"
    assert admin.counts() == {"pending": 2, "published": 0, "dead": 2}


@pytest.mark.parametrize("token", ["a string", 42, ["a", "list"], None])
def test_load_token_ignores_a_token_of_the_wrong_shape(store, token):
    store.state.insert_one({"_id": "default", "resume_token": token})
    assert store.load_token("default") is None


def test_load_token_returns_a_saved_token(store):
    store.save_token("default", {"_data": "01"}, _at(0))
    assert store.load_token("default") == {"_data": "01"}
