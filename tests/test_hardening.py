"""The relay under bad input and broken state: undecodable, foreign and oversized documents,
snapshots that grow too old, topics that keep failing, publishes that must end with the lease.

Real replica set; the in-memory publisher unless the broker itself matters.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

import bson
import pytest
from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from helpers import invalid_utf8, wait_for
from pymongo.errors import PyMongoError

from mongo_outbox import InMemoryPublisher, outbox_transaction
from mongo_outbox._limits import MAX_MESSAGE_BYTES
from mongo_outbox.relay import Relay, RelayConfig


def _doc(**fields: Any) -> dict[str, Any]:
    doc = {
        "_id": ObjectId(),
        "type": "T",
        "topic": None,
        "key": None,
        "payload": b"x",
        "attributes": {},
        "created_at": dt.datetime.now(dt.timezone.utc),
        "status": "pending",
        "attempts": 0,
    }
    doc.update(fields)
    return doc


def _invalid_utf8(**fields: Any) -> RawBSONDocument:
    """An outbox document whose ``type`` holds bytes that are not UTF-8."""
    return invalid_utf8(_doc(type="PLACEHOLDER", **fields))


def _emit(client, db, n: int, *, key: str | None = "k", topic: str | None = None) -> list[Any]:
    with outbox_transaction(client, database=db) as tx:
        return [tx.emit("Good", f"{i}".encode(), key=key, topic=topic) for i in range(n)]


def _outbox(client, db):
    """The outbox read leniently: the tests store documents that are not valid UTF-8."""
    lenient = CodecOptions(tz_aware=True, unicode_decode_error_handler="replace")
    return client[db].get_collection("outbox", codec_options=lenient)


def _status(client, db, event_id) -> dict[str, Any]:
    return _outbox(client, db).find_one({"_id": event_id})


# -- 2, 3: documents the relay cannot decode or that are not ours -----------------------------


def test_undecodable_document_on_the_stream_is_dead_and_the_relay_goes_on(
    client, db_name, relay_factory
):
    memory = InMemoryPublisher()
    relay = relay_factory(db_name, publisher=memory, default_topic="t")
    wait_for(lambda: relay.relay._role.checkpoint.token is not None)  # tailing the stream now
    before = _emit(client, db_name, 50)
    bad_id = ObjectId()
    client[db_name].outbox.insert_one(_invalid_utf8(_id=bad_id))
    after = _emit(client, db_name, 50)
    wait_for(lambda: len(memory.messages) >= 100)
    assert [m.event_id for m in memory.messages] == before + after
    doc = wait_for(lambda: _outbox(client, db_name).find_one({"status": "dead"}))
    assert doc["_id"] == bad_id
    assert "cannot decode" in doc["last_error"]
    assert relay.thread.is_alive()
    relay.stop()
    assert relay.relay.stats.dead == 1


def test_undecodable_and_foreign_documents_in_a_sweep_are_dead_and_the_rest_flows(client, db_name):
    before = _emit(client, db_name, 40)
    outbox = client[db_name].outbox
    bad_id = ObjectId()
    outbox.insert_one(_invalid_utf8(_id=bad_id))
    outbox.insert_one(_doc(_id="order-17"))  # a string _id: not ours, but must not stay pending
    outbox.insert_one(_doc(_id=42, payload="not bytes"))
    after = _emit(client, db_name, 40)
    memory = InMemoryPublisher()
    relay = Relay(client, memory, RelayConfig(database=db_name, default_topic="t"))
    assert relay.run_once() == 80
    assert [m.event_id for m in memory.messages] == before + after
    for event_id in (bad_id, "order-17", 42):
        assert _status(client, db_name, event_id)["status"] == "dead", event_id
    assert "cannot decode" in _status(client, db_name, bad_id)["last_error"]
    assert "_id must be an ObjectId" in _status(client, db_name, "order-17")["last_error"]
    assert outbox.count_documents({"status": "pending"}) == 0


# -- 5: a message that can never be accepted --------------------------------------------------


def test_oversized_document_is_dead_at_once_and_other_topics_flow(
    client, db_name, pubsub, relay_factory
):
    big_topic, _ = pubsub.topic()
    topic, sub = pubsub.topic()
    relay = relay_factory(db_name, default_topic=topic)
    wait_for(lambda: relay.relay._role.checkpoint.token is not None)
    huge = _doc(topic=big_topic, key="k", payload=b"x" * (MAX_MESSAGE_BYTES + 1_000_000))
    started = time.monotonic()
    client[db_name].outbox.insert_one(huge)
    good = _emit(client, db_name, 20)
    received = sub.pull_until(20, timeout=60)
    assert [m.attributes["outbox_event_id"] for m in received] == [str(i) for i in good]
    doc = wait_for(lambda: client[db_name].outbox.find_one({"_id": huge["_id"], "status": "dead"}))
    time_to_dead = time.monotonic() - started
    print(f"\n[hardening] 11 MB document dead after {time_to_dead:.2f} s; 20 events flowed past")
    assert "10,000,000" in doc["last_error"]
    assert doc["attempts"] == 1
    assert time_to_dead < 10, time_to_dead  # dead at once, not after retries or timeouts
    relay.stop()


# -- 7: a sweep longer than the server's snapshot history --------------------------------------


class _SlowPublisher(InMemoryPublisher):
    """Takes ``pause`` seconds per publish call: a sweep that outlives the snapshot window."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    def publish(self, messages, *, timeout=None):
        time.sleep(self.pause)  # simulated broker latency, not synchronisation
        return super().publish(messages, timeout=timeout)


@pytest.fixture
def short_snapshot_history(client):
    admin = client.admin
    old = admin.command({"getParameter": 1, "minSnapshotHistoryWindowInSeconds": 1})
    admin.command({"setParameter": 1, "minSnapshotHistoryWindowInSeconds": 1})
    yield
    admin.command(
        {
            "setParameter": 1,
            "minSnapshotHistoryWindowInSeconds": old["minSnapshotHistoryWindowInSeconds"],
        }
    )


@pytest.mark.slow
def test_sweep_survives_snapshot_too_old_and_resumes_where_it_was(
    client, db_name, short_snapshot_history
):
    written: list[Any] = []
    for _ in range(10):
        written += _emit(client, db_name, 30, key=None)
    # Other writes keep the server's oldest kept timestamp moving while the sweep runs.
    halt = threading.Event()

    def churn() -> None:
        n = 0
        while not halt.is_set():
            client[db_name].churn.insert_one({"n": n})
            n += 1
            halt.wait(0.01)

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    publisher = _SlowPublisher(pause=0.3)
    config = RelayConfig(database=db_name, default_topic="t", batch_size=20)
    relay = Relay(client, publisher, config)
    try:
        published = relay.run_once()
    finally:
        halt.set()
        churner.join()
    print(f"\n[hardening] sweep resumed {relay.stats.sweep_resumes}x; {published} published")
    assert relay.stats.sweep_resumes >= 1
    ids = [m.event_id for m in publisher.messages]
    assert set(written) <= set(ids)
    # Resumed after the last _id handled, not from the start: nothing swept twice.
    assert len(ids) == len(set(ids)) == published
    assert client[db_name].outbox.count_documents({"status": "pending"}) == 0


# -- 10: a topic that keeps failing does not hold the others back ------------------------------


def test_a_topic_failing_transiently_is_isolated_and_other_topics_flow(
    client, db_name, relay_factory
):
    memory = InMemoryPublisher()
    memory.fail_topic("sick", transient=True)
    relay = relay_factory(
        db_name,
        publisher=memory,
        default_topic="well",
        isolate_after=0.5,
        transient_initial=0.05,
        transient_max=0.2,
    )
    sick = _emit(client, db_name, 5, key="s", topic="sick")
    well = _emit(client, db_name, 5, key="w")
    wait_for(lambda: len(memory.messages) == 5, timeout=20)
    assert [m.event_id for m in memory.messages] == well
    more_well = _emit(client, db_name, 3, key="w")
    more_sick = _emit(client, db_name, 2, key="s", topic="sick")
    wait_for(lambda: len(memory.messages) == 8, timeout=20)
    assert [m.event_id for m in memory.messages][5:] == more_well
    assert all(_status(client, db_name, i)["status"] == "pending" for i in sick + more_sick)
    memory.heal_topic("sick")
    wait_for(lambda: len(memory.messages) == 15, timeout=60)
    assert [m.event_id for m in memory.messages if m.topic == "sick"] == sick + more_sick
    relay.stop()


# -- 10: a Publish call never outlives the lease -----------------------------------------------


class _RecordingPublisher(InMemoryPublisher):
    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def publish(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        return super().publish(messages, timeout=timeout)


def test_publish_deadline_is_what_is_left_of_the_lease(client, db_name):
    _emit(client, db_name, 10)
    publisher = _RecordingPublisher()
    relay = Relay(client, publisher, RelayConfig(database=db_name, default_topic="t", lease_ttl=4))
    assert relay.run_once() == 10
    assert publisher.timeouts
    # The lease is trusted for 3/4 of its ttl after a renewal started: never longer.
    assert all(t is not None and 0 < t <= 3.0 for t in publisher.timeouts), publisher.timeouts


# -- 7: restart backoff starts afresh after a run that made progress ---------------------------


def test_restart_backoff_resets_after_a_steady_run(client, db_name, monkeypatch):
    relay = Relay(client, InMemoryPublisher(), RelayConfig(database=db_name, default_topic="t"))
    attempts: list[int] = []
    runs = iter([0, 0, 0, 5, 0, "stop"])

    class Run:
        steady = False

        def run(self) -> None:
            step = next(runs)
            if step == "stop":
                relay.stop()
                return
            self.steady = bool(step)  # consumed the stream for a while without failing
            raise PyMongoError("connection lost")

    worker = relay._role
    monkeypatch.setattr(worker, "_pipeline", lambda stop, *, once: Run())
    monkeypatch.setattr(worker, "_restarts", _RecordingBackoff(attempts))
    relay.run(threading.Event())
    assert attempts == [1, 2, 3, 1, 2]


class _RecordingBackoff:
    def __init__(self, attempts: list[int]) -> None:
        self.attempts = attempts

    def delay(self, attempt: int) -> float:
        self.attempts.append(attempt)
        return 0.0


# -- 9: two relay names on one outbox ----------------------------------------------------------


def test_two_relay_names_on_one_outbox_are_warned_about(client, db_name, relay_factory, caplog):
    caplog.set_level(logging.WARNING, logger="mongo_outbox")
    first = relay_factory(db_name, publisher=InMemoryPublisher(), name="a", lease_ttl=1.0)
    second = relay_factory(db_name, publisher=InMemoryPublisher(), name="b", lease_ttl=1.0)

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "both publish" in r.getMessage()]

    messages = wait_for(warned, timeout=20)
    assert any(f"{db_name}.outbox" in m for m in messages), messages
    first.stop()
    second.stop()


# -- review findings: undecodable bytes anywhere the relay or status reads ---------------------


def test_undecodable_key_under_the_hold_policy_does_not_stop_later_sweeps(client, db_name):
    client[db_name].outbox.insert_one(invalid_utf8(_doc(topic="t", key="KEYPLACE"), "KEYPLACE"))
    config = RelayConfig(database=db_name, default_topic="t", dead_key_policy="hold")
    first = Relay(client, InMemoryPublisher(), config)
    assert first.run_once() == 0  # sets the bad document dead
    good = _emit(client, db_name, 3)
    memory = InMemoryPublisher()
    assert Relay(client, memory, config).run_once() == 3  # reads the dead keys again
    assert [m.event_id for m in memory.messages] == good


def test_undecodable_bytes_in_the_state_document_do_not_stop_the_relay(client, db_name, caplog):
    state = client[db_name].outbox_relay_state
    state.insert_one(
        invalid_utf8({"_id": "default", "fence": "FENCEBAD", "note": "NOTEBAD"}, "BAD")
    )
    good = _emit(client, db_name, 3)
    memory = InMemoryPublisher()
    relay = Relay(client, memory, RelayConfig(database=db_name, default_topic="t", lease_ttl=2))
    assert relay.run_once() == 3
    assert [m.event_id for m in memory.messages] == good
    assert relay._role.lease.fence is None  # released; the fence it held was repaired to a number
    lenient = CodecOptions(unicode_decode_error_handler="replace")
    doc = client[db_name].get_collection("outbox_relay_state", codec_options=lenient).find_one()
    assert isinstance(doc["fence"], int)
    assert doc["resume_token"] is not None


def test_poison_holds_its_key_under_the_hold_policy(client, db_name):
    outbox = client[db_name].outbox
    poison = _doc(topic="orders", key="k1", attributes={"n": 1})  # a non-string attribute value
    outbox.insert_one(poison)
    later = _emit(client, db_name, 2, key="k1", topic="orders")
    other = _emit(client, db_name, 1, key="k2", topic="orders")
    memory = InMemoryPublisher()
    config = RelayConfig(database=db_name, default_topic="t", dead_key_policy="hold")
    assert Relay(client, memory, config).run_once() == 1
    assert [m.event_id for m in memory.messages] == other
    assert _status(client, db_name, poison["_id"])["status"] == "dead"
    assert all(_status(client, db_name, i)["status"] == "pending" for i in later)


def test_status_reports_undecodable_dead_documents(client, db_name, mongodb_uri, capsys):
    from mongo_outbox.cli import main

    bad = _doc(type="TYPEBAD", key="KEYBAD", status="dead", last_error="poison: x")
    client[db_name].outbox.insert_one(invalid_utf8(bad, "BAD"))
    code = main(["status", "--mongo-uri", mongodb_uri, "--database", db_name])
    out = capsys.readouterr().out
    assert code == 0
    assert str(bad["_id"]) in out


def test_sweep_resumed_after_a_string_id_still_reaches_object_ids(client, db_name):
    from mongo_outbox._store import OutboxStore

    outbox = client[db_name].outbox
    outbox.insert_one(_doc(_id="a-string-id"))
    ids = _emit(client, db_name, 3)
    store = OutboxStore(client[db_name])
    # String _ids sort before ObjectIds: a resume after one must still reach them, with and
    # without a snapshot read, and not return the bound itself.
    for at in (None, store.cluster_time()):
        batches = store.pending_batches(10, at=at, after="a-string-id")
        assert [bson.decode(d.raw)["_id"] for b in batches for d in b] == ids
