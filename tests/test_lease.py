"""The relay lease on a real replica set: corrupt state is repaired, shared outboxes are seen."""

from __future__ import annotations

import datetime as dt
import logging
import math

import pytest
from bson import Decimal128, Int64, MaxKey, Regex, Timestamp
from pymongo.errors import OperationFailure

from mongo_outbox import ConfigurationError, outbox_transaction
from mongo_outbox._admin import OutboxAdmin
from mongo_outbox._store import state_collection_name
from mongo_outbox.relay._lease import Lease

NOW = dt.datetime.now(dt.timezone.utc)
LONG_AGO = NOW - dt.timedelta(hours=1)
FAR_AHEAD = NOW + dt.timedelta(days=3650)


@pytest.fixture
def state(client, db_name):
    return client[db_name][state_collection_name("outbox")]


def _lease(state, owner: str = "relay-a", name: str = "default", ttl: float = 15.0) -> Lease:
    return Lease(state, name, owner, ttl)


def _fenced_update_matches(state, lease: Lease) -> int:
    return state.update_one(lease.fenced(), {"$set": {"probe": 1}}).matched_count


def _assert_sound(state, lease: Lease, before: float) -> None:
    """The lease is held with an Int64 fence above ``before`` that the fenced filter matches."""
    doc = state.find_one({"_id": lease.name})
    assert isinstance(doc["fence"], Int64), doc
    assert type(lease.fence) is int
    assert lease.fence == doc["fence"]
    assert lease.fence > before
    assert doc["lease_owner"] == lease.owner
    assert isinstance(doc["lease_expires_at"], dt.datetime)
    assert lease.held
    assert _fenced_update_matches(state, lease) == 1
    assert lease.renew() is True


# -- corrupt state ---------------------------------------------------------------------------

# (state document fields, fence the new holder's must exceed)
_CORRUPT_FENCES = [
    pytest.param({"fence": "7"}, 0, id="string"),
    pytest.param({"fence": 1.5}, 1.5, id="fractional"),
    pytest.param({"fence": math.nan}, 0, id="nan"),
    pytest.param({"fence": -3}, 0, id="negative"),
    pytest.param({"fence": math.inf}, 0, id="infinite"),
    pytest.param({"fence": Int64(2**63 - 1)}, 0, id="huge"),
    pytest.param({"fence": 1e300}, 0, id="huge-double"),
    pytest.param({"fence": Decimal128("4.25")}, 4.25, id="decimal"),
    pytest.param({"fence": 6.0}, 6, id="integral-double"),
    pytest.param({"fence": [3]}, 0, id="array"),
]


@pytest.mark.parametrize(("fields", "above"), _CORRUPT_FENCES)
def test_a_corrupt_fence_is_repaired_and_bumped(state, caplog, fields, above):
    state.insert_one({"_id": "default", "lease_owner": None, **fields})
    lease = _lease(state)
    with caplog.at_level(logging.WARNING, logger="mongo_outbox.relay"):
        assert lease.try_acquire() is True
    _assert_sound(state, lease, above)
    repaired = [r.getMessage() for r in caplog.records if "repaired" in r.getMessage()]
    assert len(repaired) == 1, caplog.text
    assert "fence" in repaired[0]
    assert f"fence {lease.fence}" in repaired[0]


@pytest.mark.parametrize("fields", [{}, {"fence": None}], ids=["missing", "null"])
def test_an_absent_fence_counts_from_zero(state, caplog, fields):
    # As a checkpoint written without a lease leaves the state document: nothing to repair.
    state.insert_one({"_id": "default", "resume_token": {"_data": "00"}, **fields})
    lease = _lease(state)
    with caplog.at_level(logging.WARNING, logger="mongo_outbox.relay"):
        assert lease.try_acquire() is True
    _assert_sound(state, lease, 0)
    assert lease.fence == 1
    assert not caplog.records


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"lease_expires_at": "2999-01-01"}, id="expiry-string"),
        pytest.param({"lease_expires_at": Timestamp(2**31 - 1, 1)}, id="expiry-timestamp"),
        pytest.param({"lease_expires_at": Regex("x")}, id="expiry-regex"),
        pytest.param({"lease_expires_at": MaxKey()}, id="expiry-maxkey"),
        pytest.param({"lease_expires_at": None}, id="expiry-null"),
        pytest.param({"lease_owner": 42, "lease_expires_at": FAR_AHEAD}, id="owner-int"),
        pytest.param({"lease_owner": {"x": 1}, "lease_expires_at": FAR_AHEAD}, id="owner-object"),
    ],
)
def test_a_wrongly_typed_expiry_or_owner_does_not_block(state, caplog, fields):
    state.insert_one({"_id": "default", "fence": 5, "lease_owner": "ghost", **fields})
    lease = _lease(state)
    with caplog.at_level(logging.WARNING, logger="mongo_outbox.relay"):
        assert lease.try_acquire() is True
    _assert_sound(state, lease, 5)
    assert lease.fence == 6  # a takeover: the previous holder, if any, is fenced off
    assert any("repaired" in r.getMessage() for r in caplog.records), caplog.text


def test_a_live_lease_of_another_relay_still_blocks(state):
    state.insert_one(
        {"_id": "default", "fence": 5, "lease_owner": "ghost", "lease_expires_at": FAR_AHEAD}
    )
    assert _lease(state).try_acquire() is False
    assert state.find_one({"_id": "default"})["fence"] == 5


def test_a_holder_whose_fence_is_corrupted_reacquires_with_a_new_one(state):
    lease = _lease(state)
    assert lease.try_acquire() is True
    old_filter = lease.fenced()
    state.update_one({"_id": "default"}, {"$set": {"fence": 1.5}})
    assert lease.renew() is False  # its fence no longer matches: it stops
    assert lease.try_acquire() is True
    _assert_sound(state, lease, 1.5)
    assert state.update_one(old_filter, {"$set": {"probe": 2}}).matched_count == 0


def test_a_sound_lease_is_left_alone(state, caplog):
    lease = _lease(state)
    with caplog.at_level(logging.INFO, logger="mongo_outbox.relay"):
        assert lease.try_acquire() is True
        first = lease.fence
        assert lease.try_acquire() is True  # ours already: no bump
    assert lease.fence == first == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _assert_sound(state, lease, 0)


def test_authorization_errors_are_configuration_errors(state, monkeypatch):
    lease = _lease(state)

    def refuse(*args, **kwargs):
        raise OperationFailure("not authorized on db to execute command", code=13)

    monkeypatch.setattr(lease.state, "find_one_and_update", refuse)
    with pytest.raises(ConfigurationError, match="not authorized"):
        lease.try_acquire()


def test_other_server_errors_are_logged_as_such(state, client, db_name, caplog):
    state.insert_one({"_id": "default", "fence": 1, "lease_owner": None})
    # A validator that refuses every lease owner: a real error from the server, not the network.
    client[db_name].command("collMod", state.name, validator={"lease_owner": {"$type": "int"}})
    lease = _lease(state)
    with (
        caplog.at_level(logging.WARNING, logger="mongo_outbox.relay"),
        pytest.raises(OperationFailure),
    ):
        lease.try_acquire()
    messages = [r.getMessage() for r in caplog.records]
    assert any("code 121" in m and "lease" in m for m in messages), messages
    assert not any("cannot reach" in m for m in messages)


def test_relay_runs_over_a_corrupt_fence(client, db_name, pubsub, relay_factory, caplog):
    topic, sub = pubsub.topic()
    state = client[db_name][state_collection_name("outbox")]
    state.insert_one({"_id": "default", "fence": "7"})
    with outbox_transaction(client, database=db_name) as tx:
        ids = [tx.emit("E", f"{i}".encode(), key="k") for i in range(5)]
    runner = relay_factory(db_name, default_topic=topic, start=False, lease_ttl=2.0)
    with caplog.at_level(logging.WARNING, logger="mongo_outbox.relay"):
        assert runner.relay.run_once() == 5
    got = sub.pull_until(5)
    assert [m.attributes["outbox_event_id"] for m in got] == [str(i) for i in ids]
    doc = state.find_one({"_id": "default"})
    assert doc.get("resume_token") is not None
    assert isinstance(doc["fence"], Int64)
    assert OutboxAdmin(client[db_name]).counts()["pending"] == 0
    assert any("repaired" in r.getMessage() for r in caplog.records)


def test_relay_runs_over_a_fractional_fence(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    state = client[db_name][state_collection_name("outbox")]
    state.insert_one({"_id": "default", "fence": 1.5, "lease_owner": None})
    with outbox_transaction(client, database=db_name) as tx:
        tx.emit("E", b"x", key="k")
    runner = relay_factory(db_name, default_topic=topic, start=False, lease_ttl=2.0)
    assert runner.relay.run_once() == 1
    sub.pull_until(1)
    assert state.find_one({"_id": "default"}).get("resume_token") is not None


# -- other relay names on the same outbox ----------------------------------------------------


def test_others_active_lists_other_live_names(state):
    a = _lease(state, "host:1", name="default")
    b = _lease(state, "host:2", name="billing")
    standby = _lease(state, "host:3", name="default")
    assert a.others_active() == []
    assert a.try_acquire() is True
    assert standby.try_acquire() is False
    assert a.others_active() == []  # the same name is a standby, not a second publisher
    assert b.try_acquire() is True
    assert a.others_active() == ["billing"]
    assert b.others_active() == ["default"]
    b.release()
    assert a.others_active() == []


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"lease_owner": "x", "lease_expires_at": LONG_AGO}, id="expired"),
        pytest.param({"lease_owner": None, "lease_expires_at": FAR_AHEAD}, id="released"),
        pytest.param({"lease_owner": 42, "lease_expires_at": FAR_AHEAD}, id="owner-int"),
        pytest.param({"lease_owner": "x", "lease_expires_at": MaxKey()}, id="expiry-maxkey"),
        pytest.param({"lease_owner": "x"}, id="no-expiry"),
        pytest.param({"resume_token": {"_data": "00"}}, id="checkpoint-only"),
    ],
)
def test_others_active_ignores_names_without_a_live_lease(state, fields):
    state.insert_one({"_id": "other", **fields})
    lease = _lease(state)
    assert lease.try_acquire() is True
    assert lease.others_active() == []


def test_a_second_name_is_warned_about_once(state, db_name, caplog):
    a = _lease(state, "host:1", name="default")
    assert a.try_acquire() is True
    with caplog.at_level(logging.WARNING, logger="mongo_outbox.relay"):
        assert a.warn_other_relays() == []
        b = _lease(state, "host:2", name="billing")
        assert b.try_acquire() is True
        for _ in range(3):
            assert a.warn_other_relays() == ["billing"]
        c = _lease(state, "host:3", name="audit")
        assert c.try_acquire() is True
        assert a.warn_other_relays() == ["audit", "billing"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"relay names default and {other} both publish from outbox {db_name}.outbox: every "
        "event is published by each; give them the same --name (one active, others standby)"
        for other in ("billing", "audit")
    ]


def test_active_relays_lists_every_state_document(state, client, db_name):
    a = _lease(state, "host:1", name="default")
    assert a.try_acquire() is True
    state.insert_one(
        {"_id": "old", "lease_owner": "host:9", "lease_expires_at": LONG_AGO, "checkpoint_at": NOW}
    )
    state.insert_one({"_id": "weird", "lease_owner": 7, "lease_expires_at": "soon"})
    relays = {r.name: r for r in OutboxAdmin(client[db_name]).active_relays()}
    assert set(relays) == {"default", "old", "weird"}
    live = relays["default"]
    assert live.live is True
    assert live.owner == "host:1"
    assert isinstance(live.lease_expires_at, dt.datetime)
    assert 0 < live.lease_remaining <= 15
    assert live.checkpoint_at is None
    old = relays["old"]
    assert (old.live, old.owner, old.lease_remaining) == (False, "host:9", None)
    assert abs((old.checkpoint_at - NOW).total_seconds()) < 0.01
    weird = relays["weird"]
    assert (weird.live, weird.owner, weird.lease_expires_at) == (False, None, None)


# -- relays that split the outbox another way -----------------------------------------------


def _partition_lease(state, index: int, count: int, owner: str) -> Lease:
    tags = {"group": "default", "partition": index, "partitions": count}
    return Lease(state, f"default#{index}/{count}", owner, 15.0, group="default", tags=tags)


def _expire(state, lease: Lease) -> None:
    state.update_one({"_id": lease.name}, {"$set": {"lease_expires_at": LONG_AGO}})


def test_an_expired_lease_is_not_renewed_and_the_group_keeps_its_partitions(state):
    """A relay without partitions paused past its lease finds a group running when it wakes:
    it may not renew, and taking the lease anew yields to the group."""
    single = _lease(state)
    assert single.try_acquire()
    _expire(state, single)  # paused longer than the lease
    part = _partition_lease(state, 0, 4, "member-a")
    assert part.try_acquire()  # the expired lease holds nothing
    assert single.renew() is False
    assert single.try_acquire() is False
    assert state.find_one({"_id": "default"})["lease_owner"] is None
    assert part.renew() is True


def test_a_partition_lease_yields_to_a_live_relay_without_partitions(state):
    single = _lease(state)
    assert single.try_acquire()
    part = _partition_lease(state, 1, 4, "member-a")
    assert part.try_acquire() is False
    assert state.find_one({"_id": "default#1/4"})["lease_owner"] is None
    single.release()
    assert part.try_acquire()


def test_a_partition_lease_yields_to_a_group_with_another_count(state):
    old = _partition_lease(state, 0, 4, "member-a")
    assert old.try_acquire()
    new = _partition_lease(state, 0, 8, "member-b")
    assert new.try_acquire() is False
    same = _partition_lease(state, 3, 4, "member-c")
    assert same.try_acquire()  # the same count: no rival
    old.release()
    same.release()
    assert new.try_acquire()


def test_a_member_heartbeat_is_no_rival(state):
    state.insert_one(
        {
            "_id": "default#member:m",
            "group": "default",
            "kind": "member",
            "partitions": 8,
            "lease_owner": "m",
            "lease_expires_at": FAR_AHEAD,
        }
    )
    assert _partition_lease(state, 0, 4, "member-a").try_acquire()
