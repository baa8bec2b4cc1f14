"""The relay end to end: real replica set, real Pub/Sub emulator."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest
from bson import ObjectId
from helpers import wait_for
from pymongo import MongoClient

from mongo_outbox import ValidationError, outbox_transaction
from mongo_outbox._admin import OutboxAdmin
from mongo_outbox._store import OutboxStore


def _write_events(
    client: MongoClient[Any],
    db: str,
    keys: int,
    count: int,
    per_tx: int = 3,
    start: int = 0,
    **emit: Any,
) -> list[dict[str, Any]]:
    """Write events ``start`` to ``count - 1`` over ``keys`` keys, each with a domain insert."""
    written: list[dict[str, Any]] = []
    n = start
    while n < count:
        with outbox_transaction(client, database=db) as tx:
            for _ in range(min(per_tx, count - n)):
                key = f"key-{n % keys}"
                payload = {"n": n, "key": key, "note": "héllo"}
                client[db].orders.insert_one({"_id": n}, session=tx.session)
                attributes = {"tenant": f"t{n % 3}"}
                event_id = tx.emit("OrderCreated", payload, key=key, attributes=attributes, **emit)
                written.append(
                    {"id": event_id, "key": key, "payload": payload, "attributes": attributes}
                )
                n += 1
    return written


def _assert_delivered(written: list[dict[str, Any]], received: list[Any]) -> None:
    """Every written event arrived as written, and per key in the order written."""
    by_id: dict[str, Any] = {}
    order: dict[str, list[str]] = defaultdict(list)
    for msg in received:
        event_id = msg.attributes["outbox_event_id"]
        if event_id not in by_id:
            by_id[event_id] = msg
            order[msg.ordering_key].append(event_id)
    assert set(by_id) == {str(w["id"]) for w in written}
    expected_order: dict[str, list[str]] = defaultdict(list)
    for w in written:
        msg = by_id[str(w["id"])]
        assert json.loads(msg.data) == w["payload"]
        assert msg.ordering_key == w["key"]
        attrs = dict(msg.attributes)
        assert attrs.pop("outbox_event_type") == "OrderCreated"
        assert attrs.pop("outbox_event_id") == str(w["id"])
        created = attrs.pop("outbox_created_at")
        assert created.endswith("Z")
        assert created[:10] == ObjectId(str(w["id"])).generation_time.strftime("%Y-%m-%d")
        assert attrs == w["attributes"]
        expected_order[w["key"]].append(str(w["id"]))
    assert dict(order) == dict(expected_order)


def test_thousand_events_over_ten_keys_arrive_in_order(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    relay = relay_factory(db_name, default_topic=topic)
    written = _write_events(client, db_name, keys=10, count=1000, per_tx=4)
    received = sub.pull_until(1000)
    _assert_delivered(written, received)
    wait_for(lambda: OutboxAdmin(client[db_name]).counts()["published"] == 1000)
    assert OutboxAdmin(client[db_name]).counts() == {"pending": 0, "published": 1000, "dead": 0}
    relay.stop()
    assert relay.relay.stats.published == 1000
    # The quiet steady state publishes nothing twice.
    assert len(sub.drain_quietly(quiet=1.0)) == 1000


def test_aborted_transactions_leave_and_publish_nothing(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    relay_factory(db_name, default_topic=topic)
    with pytest.raises(RuntimeError), outbox_transaction(client, database=db_name) as tx:
        client[db_name].orders.insert_one({"_id": "lost-1"}, session=tx.session)
        tx.emit("OrderCreated", {"id": "lost-1"}, key="k")
        raise RuntimeError("boom")
    with (
        pytest.raises(ValidationError, match="JSON"),
        outbox_transaction(client, database=db_name) as tx,
    ):
        client[db_name].orders.insert_one({"_id": "lost-2"}, session=tx.session)
        tx.emit("OrderCreated", {"id": "lost-2"}, key="k")
        tx.emit("OrderCreated", {"bad": object()}, key="k")
    assert client[db_name].orders.count_documents({}) == 0
    assert client[db_name].outbox.count_documents({}) == 0
    # A sentinel written afterwards is the only thing that arrives.
    with outbox_transaction(client, database=db_name) as tx:
        sentinel = tx.emit("Sentinel", b"end")
    received = sub.pull_until(1)
    assert [m.attributes["outbox_event_id"] for m in sub.drain_quietly(quiet=1.0)] == [
        str(sentinel)
    ]
    assert received[0].data == b"end"


def test_restart_resumes_from_checkpoint(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    first = relay_factory(db_name, default_topic=topic)
    before = _write_events(client, db_name, keys=3, count=30)
    sub.pull_until(30)
    first.stop()
    state = OutboxStore(client[db_name]).load_state("default")
    assert state.get("resume_token") is not None
    during = _write_events(client, db_name, keys=3, count=90, start=30)
    second = relay_factory(db_name, default_topic=topic)
    received = sub.pull_until(90)
    _assert_delivered(before + during, received)
    second.stop()
    assert second.relay.stats.recoveries == 0, "restart should resume from the token"


def test_events_written_before_the_relay_ever_ran_arrive_by_sweep(
    client, db_name, pubsub, relay_factory
):
    topic, sub = pubsub.topic()
    written = _write_events(client, db_name, keys=5, count=200, per_tx=10)
    relay = relay_factory(db_name, default_topic=topic)
    _assert_delivered(written, sub.pull_until(200))
    relay.stop()
    assert relay.relay.stats.recoveries == 1


def test_deleting_the_checkpoint_loses_nothing(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    first = relay_factory(db_name, default_topic=topic)
    a = _write_events(client, db_name, keys=4, count=20)
    sub.pull_until(20)
    first.stop()
    client[db_name].outbox_relay_state.delete_many({})
    b = _write_events(client, db_name, keys=4, count=50, start=20)
    second = relay_factory(db_name, default_topic=topic)
    received = sub.pull_until(50)
    _assert_delivered(a + b, received)
    second.stop()
    assert second.relay.stats.recoveries == 1


@pytest.mark.parametrize("bad_token", [{"_data": "zz"}, {"x": 1}, "not-a-token"])
def test_unusable_resume_token_falls_back_to_recovery(
    client, db_name, pubsub, relay_factory, bad_token
):
    topic, sub = pubsub.topic()
    client[db_name].outbox_relay_state.insert_one({"_id": "default", "resume_token": bad_token})
    written = _write_events(client, db_name, keys=2, count=40)
    relay = relay_factory(db_name, default_topic=topic)
    _assert_delivered(written, sub.pull_until(40))
    relay.stop()
    assert relay.relay.stats.recoveries == 1
    token = OutboxStore(client[db_name]).load_state("default")["resume_token"]
    assert token != bad_token


def test_per_event_topic_and_default_topic(client, db_name, pubsub, relay_factory):
    default_topic, default_sub = pubsub.topic()
    other_topic, other_sub = pubsub.topic()
    relay_factory(db_name, default_topic=default_topic)
    with outbox_transaction(client, database=db_name) as tx:
        to_other = tx.emit("A", "to other", topic=other_topic)
        to_default = tx.emit("B", "to default")
        full_path = tx.emit("C", "by path", topic=f"projects/{pubsub.project}/topics/{other_topic}")
    got_other = other_sub.pull_until(2)
    got_default = default_sub.pull_until(1)
    assert {m.attributes["outbox_event_id"] for m in got_other} == {str(to_other), str(full_path)}
    assert [m.attributes["outbox_event_id"] for m in got_default] == [str(to_default)]
    assert got_default[0].data == b"to default"


def test_run_once_drains_and_returns(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    written = _write_events(client, db_name, keys=3, count=25)
    runner = relay_factory(db_name, default_topic=topic, start=False)
    assert runner.relay.run_once() == 25
    _assert_delivered(written, sub.pull_until(25))
    assert OutboxAdmin(client[db_name]).counts()["pending"] == 0
    assert OutboxStore(client[db_name]).load_state("default").get("resume_token") is not None


def test_missing_topic_fails_the_event_not_the_relay(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    relay = relay_factory(db_name, default_topic=topic, max_attempts=2, retry_initial=0.05)
    with outbox_transaction(client, database=db_name) as tx:
        doomed = tx.emit("X", b"nowhere", topic="no-such-topic", key="k1")
        fine = tx.emit("Y", b"fine", key="k2")
    assert [m.attributes["outbox_event_id"] for m in sub.pull_until(1)] == [str(fine)]
    doc = wait_for(
        lambda: client[db_name].outbox.find_one({"_id": doomed, "status": "dead"}), timeout=30
    )
    assert doc["attempts"] == 2
    assert "does not exist" in doc["last_error"]
    assert relay.thread.is_alive()


def test_servers_without_snapshot_reads_get_a_majority_read(
    client, db_name, pubsub, relay_factory, monkeypatch
):
    from mongo_outbox import _store

    def unavailable(self, *args):
        raise _store._SnapshotUnavailable
        yield  # a generator, as the real one

    monkeypatch.setattr(_store.OutboxStore, "_snapshot_find", unavailable)
    topic, sub = pubsub.topic()
    written = _write_events(client, db_name, keys=4, count=120, per_tx=7)
    relay = relay_factory(db_name, default_topic=topic)
    more = _write_events(client, db_name, keys=4, count=160, start=120)
    _assert_delivered(written + more, sub.pull_until(160))
    relay.stop()
