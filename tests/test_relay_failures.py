"""Relay behaviour under failing keys and poison documents (in-memory publisher, real MongoDB)."""

from __future__ import annotations

import datetime as dt
import time

from bson import ObjectId
from helpers import wait_for

from mongo_outbox import InMemoryPublisher, outbox_transaction
from mongo_outbox._admin import OutboxAdmin


def test_failing_key_holds_its_later_events_while_other_keys_flow(client, db_name, relay_factory):
    memory = InMemoryPublisher()
    memory.fail_topic("broken")
    relay = relay_factory(
        db_name, publisher=memory, default_topic="ok", retry_initial=0.2, retry_max=0.4
    )
    with outbox_transaction(client, database=db_name) as tx:
        blocker = tx.emit("E", b"k-0", key="K", topic="broken")
        k_later = [tx.emit("E", f"k-{i}".encode(), key="K", topic="broken") for i in range(1, 4)]
        others = [tx.emit("E", f"o-{i}".encode(), key="O") for i in range(3)]
    wait_for(lambda: len(memory.messages) >= 3)
    assert [m.event_id for m in memory.messages] == others
    doc = wait_for(lambda: client[db_name].outbox.find_one({"_id": blocker, "attempts": 2}))
    assert "refused" in doc["last_error"]
    # Later events of K are still pending, never published ahead of the blocker.
    assert all(client[db_name].outbox.find_one({"_id": i})["status"] == "pending" for i in k_later)
    with outbox_transaction(client, database=db_name) as tx:
        even_later = tx.emit("E", b"k-4", key="K", topic="broken")
        # The same key on another topic is another ordering slot: it is not held.
        same_key_elsewhere = tx.emit("E", b"k-elsewhere", key="K")
        more_others = tx.emit("E", b"o-3", key="O")
    wait_for(lambda: more_others in [m.event_id for m in memory.messages])
    wait_for(lambda: same_key_elsewhere in [m.event_id for m in memory.messages])
    assert client[db_name].outbox.find_one({"_id": even_later})["status"] == "pending"
    memory.heal_topic("broken")
    wait_for(lambda: OutboxAdmin(client[db_name]).counts()["pending"] == 0, timeout=30)
    k_order = [m.event_id for m in memory.messages if m.topic == "broken"]
    assert k_order == [blocker, *k_later, even_later]
    relay.stop()


def test_poison_documents_are_set_aside_and_the_relay_goes_on(client, db_name, relay_factory):
    memory = InMemoryPublisher()
    relay = relay_factory(db_name, publisher=memory, default_topic="ok")
    now = dt.datetime.now(dt.timezone.utc)
    base = {"status": "pending", "attempts": 0, "created_at": now, "attributes": {}, "key": None}
    poison = [
        {**base, "_id": ObjectId(), "type": "T", "payload": "text, not bytes"},
        {**base, "_id": ObjectId(), "payload": b"no type"},
        {**base, "_id": ObjectId(), "type": "T", "payload": b"x", "attributes": {"n": 1}},
        {**base, "_id": ObjectId(), "type": "T", "payload": b"x", "key": "k" * 2000},
        {**base, "_id": ObjectId(), "type": "T", "payload": b"x", "created_at": "yesterday"},
    ]
    with outbox_transaction(client, database=db_name) as tx:
        good_before = tx.emit("Good", b"1")
    client[db_name].outbox.insert_many(poison)
    with outbox_transaction(client, database=db_name) as tx:
        good_after = tx.emit("Good", b"2")
    wait_for(lambda: len(memory.messages) == 2)
    assert [m.event_id for m in memory.messages] == [good_before, good_after]
    for doc in poison:
        stored = wait_for(
            lambda d=doc: client[db_name].outbox.find_one({"_id": d["_id"], "status": "dead"})
        )
        assert stored["last_error"].startswith("poison: ")
    errors = {client[db_name].outbox.find_one({"_id": d["_id"]})["last_error"] for d in poison}
    assert any("payload" in e for e in errors)
    assert any("type" in e for e in errors)
    assert any("created_at" in e for e in errors)
    assert relay.thread.is_alive()
    relay.stop()
    assert relay.relay.stats.dead == len(poison)


def test_stop_cuts_a_transient_backoff_short(client, db_name, relay_factory):
    memory = InMemoryPublisher()
    memory.fail_topic("flaky", transient=True)
    relay = relay_factory(
        db_name, publisher=memory, default_topic="flaky", transient_initial=20.0, transient_max=60.0
    )
    with outbox_transaction(client, database=db_name) as tx:
        event_id = tx.emit("E", b"x", key="k")
    wait_for(lambda: memory.calls >= 1)  # failed once: now in a backoff of at least 20 s
    started = time.monotonic()
    relay.stop()
    assert time.monotonic() - started < 5, "a 20 s backoff must not delay the stop"
    doc = client[db_name].outbox.find_one({"_id": event_id})
    assert doc["status"] == "pending"
    assert doc["attempts"] == 0, "transient failures do not count as attempts"


def test_a_relay_that_loses_its_lease_stops_publishing(client, db_name, relay_factory):
    memory = InMemoryPublisher()
    relay = relay_factory(db_name, publisher=memory, default_topic="t", lease_ttl=1.0)
    state = client[db_name].outbox_relay_state
    wait_for(lambda: (state.find_one({"_id": "default"}) or {}).get("lease_owner"))
    with outbox_transaction(client, database=db_name) as tx:
        before = tx.emit("E", b"before")
    wait_for(lambda: len(memory.messages) == 1)
    # Another relay takes the lease over (as after a long pause of this one).
    far = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    state.update_one(
        {"_id": "default"},
        {"$set": {"lease_owner": "thief", "lease_expires_at": far}, "$inc": {"fence": 1}},
    )
    token_then = state.find_one({"_id": "default"})["resume_token"]
    wait_for(lambda: not relay.relay._role.lease.held, timeout=5)
    with outbox_transaction(client, database=db_name) as tx:
        during = tx.emit("E", b"during")
    time.sleep(2)  # the fault is the absence of publishing: give it time to (wrongly) happen
    assert [m.event_id for m in memory.messages] == [before]
    assert state.find_one({"_id": "default"})["resume_token"] == token_then
    # The thief goes away: the relay takes the lease back and publishes what waited.
    state.update_one({"_id": "default"}, {"$set": {"lease_owner": None}})
    wait_for(lambda: len(memory.messages) == 2, timeout=15)
    assert memory.messages[1].event_id == during
    relay.stop()
