"""Relay groups in one process: partitions shared by members, hand-over, fences, old outboxes.

The process-level fault test (four relay processes, kill -9 and SIGTERM) is in
``test_group_faults.py``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pytest
from faults import check_delivery, committed_ids
from helpers import wait_for
from pymongo import MongoClient
from pymongo.errors import AutoReconnect

from mongo_outbox import InMemoryPublisher, Relay, RelayConfig, outbox_transaction
from mongo_outbox._admin import OutboxAdmin
from mongo_outbox._partition import Partition, slot_for
from mongo_outbox._store import SLOT_INDEX, state_collection_name
from mongo_outbox.cli import main as cli_main
from mongo_outbox.relay import _group
from mongo_outbox.relay._lease import Lease


def _emit(client: MongoClient[Any], db: str, n: int, keys: int, prefix: str = "k") -> None:
    """``n`` events over ``keys`` keys, in transactions of 50."""
    for start in range(0, n, 50):
        with outbox_transaction(client, database=db) as tx:
            for i in range(start, min(n, start + 50)):
                tx.emit("E", {"i": i}, key=f"{prefix}{i % keys}")


def _owned(client: MongoClient[Any], db: str, owner: str) -> list[int]:
    state = client[db][state_collection_name("outbox")]
    now = dt.datetime.now(dt.timezone.utc)
    return sorted(
        d["partition"]
        for d in state.find({"group": "default", "partition": {"$exists": True}})
        if d.get("lease_owner") == owner and d["lease_expires_at"] > now
    )


def _key_in(partition: Partition, prefix: str = "p") -> str:
    """A key whose slot belongs to ``partition``."""
    return next(
        f"{prefix}{i}"
        for i in range(10_000)
        if partition.owns(slot_for(f"{prefix}{i}", None))  # type: ignore[arg-type]
    )


def test_two_members_share_the_partitions_and_deliver_in_order(
    client, db_name, pubsub, relay_factory
):
    topic, sub = pubsub.topic()
    common = {"default_topic": topic, "partitions": 4, "lease_ttl": 4.0}
    first = relay_factory(db_name, owner="member-a", **common)
    wait_for(lambda: len(_owned(client, db_name, "member-a")) == 4, timeout=30)
    _emit(client, db_name, 600, keys=40)
    second = relay_factory(db_name, owner="member-b", **common)
    wait_for(
        lambda: (
            len(_owned(client, db_name, "member-a")) == 2
            and len(_owned(client, db_name, "member-b")) == 2
        ),
        timeout=30,
    )
    _emit(client, db_name, 600, keys=40)
    committed = committed_ids(client, db_name)
    sub.pull_until(len(committed), timeout=90)
    sub.drain_quietly()
    delivered, _duplicates = check_delivery(committed, sub.received)
    assert delivered == 1200
    assert first.relay.stats.published > 0
    assert second.relay.stats.published > 0
    group = OutboxAdmin(client[db_name]).group("default")
    assert group is not None
    assert group.partitions == 4
    assert sorted(m.owner for m in group.members if m.live) == ["member-a", "member-b"]
    assert sorted(p for m in group.members for p in m.owns) == [0, 1, 2, 3]
    assert client[db_name].outbox.index_information().get(SLOT_INDEX) is not None


def test_a_member_that_stops_hands_its_partitions_over(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    common = {"default_topic": topic, "partitions": 4, "lease_ttl": 4.0}
    first = relay_factory(db_name, owner="member-a", **common)
    relay_factory(db_name, owner="member-b", **common)
    wait_for(lambda: len(_owned(client, db_name, "member-b")) == 2, timeout=30)
    first.stop()
    # A graceful stop releases at once: the other member owns everything within a tick or two.
    wait_for(lambda: len(_owned(client, db_name, "member-b")) == 4, timeout=10)
    _emit(client, db_name, 300, keys=30)
    committed = committed_ids(client, db_name)
    sub.pull_until(len(committed), timeout=60)
    assert check_delivery(committed, sub.received)[0] == 300


def test_a_partition_whose_fence_moved_stops_publishing_at_once(
    client, db_name, pubsub, relay_factory, caplog
):
    caplog.set_level(logging.WARNING, logger="mongo_outbox.relay")
    topic, sub = pubsub.topic()
    relay_factory(db_name, owner="member-a", default_topic=topic, partitions=2, lease_ttl=30.0)
    wait_for(lambda: _owned(client, db_name, "member-a") == [0, 1], timeout=30)
    state = client[db_name][state_collection_name("outbox")]
    # Another relay took partition 1 (as after a pause longer than the lease): new owner, new
    # fence, a long lease.
    state.update_one(
        {"_id": "default#1/2"},
        {
            "$inc": {"fence": 1},
            "$set": {
                "lease_owner": "intruder",
                "lease_expires_at": dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5),
            },
        },
    )
    lost_key, kept_key = _key_in(Partition(1, 2)), _key_in(Partition(0, 2))
    with outbox_transaction(client, database=db_name) as tx:
        lost = [tx.emit("Lost", b"x", key=lost_key) for _ in range(5)]
        kept = [tx.emit("Kept", b"x", key=kept_key) for _ in range(5)]
    got = sub.pull_until(5, timeout=30)
    sub.drain_quietly(quiet=2.0)
    ids = {m.attributes["outbox_event_id"] for m in got}
    assert ids == {str(i) for i in kept}
    assert client[db_name].outbox.count_documents({"_id": {"$in": lost}, "status": "pending"}) == 5
    assert any("lost its lease" in r.getMessage() for r in caplog.records)


def test_an_outbox_written_before_slots_is_drained_by_a_group(
    client, db_name, pubsub, relay_factory
):
    topic, sub = pubsub.topic()
    _emit(client, db_name, 400, keys=20)
    client[db_name].outbox.update_many({}, {"$unset": {"slot": ""}})
    common = {"default_topic": topic, "partitions": 4, "lease_ttl": 4.0}
    relay_factory(db_name, owner="member-a", **common)
    relay_factory(db_name, owner="member-b", **common)
    committed = committed_ids(client, db_name)
    sub.pull_until(400, timeout=60)
    assert check_delivery(committed, sub.received)[0] == 400
    _emit(client, db_name, 100, keys=10, prefix="new")  # new events, with slots, flow too
    sub.pull_until(500, timeout=60)
    assert check_delivery(committed_ids(client, db_name), sub.received)[0] == 500


def test_a_relay_without_partitions_waits_for_a_live_group_and_back(
    client, db_name, pubsub, relay_factory
):
    topic, sub = pubsub.topic()
    member = relay_factory(db_name, owner="member-a", default_topic=topic, partitions=2)
    wait_for(lambda: _owned(client, db_name, "member-a") == [0, 1], timeout=30)
    state = client[db_name][state_collection_name("outbox")]
    single = Lease(state, "default", "single", ttl=10.0)
    assert single.try_acquire() is False  # the group is live: it waits
    assert state.find_one({"_id": "default"})["lease_owner"] is None
    member.stop()
    wait_for(lambda: single.try_acquire(), timeout=30)
    # Now a group member waits for the relay without partitions.
    waiting = relay_factory(db_name, owner="member-b", default_topic=topic, partitions=2)
    _emit(client, db_name, 10, keys=2)
    # Its heartbeat proves it is up and ticking: only then does owning nothing mean waiting.
    wait_for(lambda: state.find_one({"_id": "default#member:member-b"}), timeout=30)
    with pytest.raises(AssertionError):
        wait_for(lambda: _owned(client, db_name, "member-b"), timeout=3)
    single.release()
    wait_for(lambda: _owned(client, db_name, "member-b") == [0, 1], timeout=30)
    sub.pull_until(10, timeout=30)
    assert waiting.relay.stats.published == 10


def test_a_member_with_another_partition_count_waits(client, db_name, pubsub, relay_factory):
    topic, _ = pubsub.topic()
    relay_factory(db_name, owner="member-a", default_topic=topic, partitions=2)
    wait_for(lambda: _owned(client, db_name, "member-a") == [0, 1], timeout=30)
    relay_factory(db_name, owner="member-b", default_topic=topic, partitions=4)
    state = client[db_name][state_collection_name("outbox")]
    wait_for(lambda: state.find_one({"_id": "default#member:member-b"}), timeout=30)
    with pytest.raises(AssertionError):
        wait_for(
            lambda: state.find_one(
                {"partitions": 4, "lease_owner": "member-b", "partition": {"$exists": True}}
            ),
            timeout=3,
        )


def test_status_shows_the_group(client, db_name, pubsub, relay_factory, capsys, mongodb_uri):
    topic, sub = pubsub.topic()
    relay_factory(db_name, owner="member-a", default_topic=topic, partitions=3)
    wait_for(lambda: len(_owned(client, db_name, "member-a")) == 3, timeout=30)
    _emit(client, db_name, 60, keys=6)
    sub.pull_until(60, timeout=30)
    # What a member owns is recorded with its next heartbeat.
    admin = OutboxAdmin(client[db_name])
    wait_for(lambda: admin.group("default").members[0].owns == [0, 1, 2], timeout=10)
    capsys.readouterr()
    assert cli_main(["status", "--mongo-uri", mongodb_uri, "--database", db_name]) == 0
    out = capsys.readouterr().out
    assert "group default: 3 partitions, 1 live members" in out
    assert "member member-a  partitions 0, 1, 2" in out
    assert out.count("owner member-a") == 3
    assert "warning" not in out  # a group's members are not several relay names


def test_one_partition_writes_the_state_of_before(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    runner = relay_factory(db_name, default_topic=topic, partitions=1)
    _emit(client, db_name, 20, keys=4)
    sub.pull_until(20, timeout=30)
    runner.stop()
    docs = list(client[db_name][state_collection_name("outbox")].find())
    assert [d["_id"] for d in docs] == ["default"]
    assert set(docs[0]) == {
        "_id",
        "fence",
        "lease_owner",
        "lease_expires_at",
        "resume_token",
        "checkpoint_at",
    }
    assert SLOT_INDEX not in client[db_name].outbox.index_information()


def test_a_member_that_cannot_prepare_the_outbox_still_publishes(
    client, db_name, pubsub, relay_factory, monkeypatch
):
    def unreachable(outbox):
        raise AutoReconnect("MongoDB went away for a moment")

    monkeypatch.setattr(_group, "ensure_slot_index", unreachable)
    monkeypatch.setattr(_group, "assign_missing_slots", unreachable)
    topic, sub = pubsub.topic()
    runner = relay_factory(db_name, owner="member-a", default_topic=topic, partitions=2)
    wait_for(lambda: _owned(client, db_name, "member-a") == [0, 1], timeout=30)
    _emit(client, db_name, 20, keys=4)
    sub.pull_until(20, timeout=30)
    assert runner.thread.is_alive()


def test_run_once_of_a_member_forgets_its_partition_relays(client, db_name):
    _emit(client, db_name, 40, keys=8)
    config = RelayConfig(database=db_name, partitions=4, default_topic="orders")
    relay = Relay(client, InMemoryPublisher(), config)
    assert relay.run_once() == 40
    assert relay.run_once() == 0
    assert relay._role._workers == {}  # each partition's worker retired, its counters kept
    assert relay.stats.published == 40


def test_a_members_partitions_share_its_memory_budget(client, db_name):
    config = RelayConfig(
        database=db_name, partitions=4, queue_bytes=40_000_000, max_batch_bytes=20_000_000
    )
    relay = Relay(client, InMemoryPublisher(), config)
    parts = [relay._role._worker(i) for i in range(4)]
    # One queue budget and one sweep turn for all of them; batches of a share of the bytes.
    assert len({id(p._shared.queue_budget) for p in parts}) == 1
    assert parts[0]._shared.queue_budget.max_bytes <= config.queue_bytes
    assert len({id(p._shared.sweep_turn) for p in parts}) == 1
    assert sum(p._shared.config.max_batch_bytes for p in parts) <= config.max_batch_bytes
    assert all(p._shared.config.name == config.name for p in parts)


def test_a_members_restarts_are_counted(client, db_name, relay_factory, monkeypatch):
    from mongo_outbox.relay import _pipeline

    run = _pipeline.Pipeline.run
    failed: list[bool] = []

    def fail_once(self: _pipeline.Pipeline) -> None:
        if not failed:
            failed.append(True)
            raise AutoReconnect("MongoDB went away for a moment")
        run(self)

    monkeypatch.setattr(_pipeline.Pipeline, "run", fail_once)
    _emit(client, db_name, 10, keys=4)
    runner = relay_factory(
        db_name,
        publisher=InMemoryPublisher(),
        owner="member-a",
        default_topic="orders",
        partitions=2,
        transient_initial=0.05,
    )
    wait_for(lambda: runner.relay.stats.published == 10, timeout=30)
    assert runner.relay.stats.restarts == 1
