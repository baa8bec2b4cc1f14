"""The inbox on a real mongod and the real emulator: each event's effect happens once."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from google.cloud.pubsub_v1.subscriber.message import Message as SubscriberMessage
from helpers import wait_for
from pymongo import AsyncMongoClient

from mongo_outbox import ConfigurationError, Inbox, ensure_indexes, outbox_transaction
from mongo_outbox._inbox import inbox_id
from mongo_outbox._retention import (
    INBOX_TTL_INDEX,
    OUTBOX_TTL_INDEX,
    parse_duration,
    retention_of,
)


def _message(event_id: str | None = "65f000000000000000000001", message_id: str = "m1", key=""):
    attributes = {} if event_id is None else {"outbox_event_id": event_id}
    return SimpleNamespace(
        message_id=message_id, attributes=attributes, data=b"{}", ordering_key=key
    )


def _effects(client, db) -> list[dict[str, Any]]:
    return list(client[db].effects.find({}, sort=[("_id", 1)]))


def _record_effect(client, db):
    def handle(tx, message):
        client[db].effects.insert_one(
            {"event": message.attributes.get("outbox_event_id"), "key": message.ordering_key},
            session=tx.session,
        )

    return handle


@pytest.fixture
def inbox(client, db_name) -> Inbox:
    box = Inbox(client, database=db_name, consumer="billing")
    box.ensure_collection()
    return box


# -- process -----------------------------------------------------------------------------------


def test_process_runs_the_handler_once_per_event(client, db_name, inbox):
    handle = _record_effect(client, db_name)
    assert inbox.process(_message(), handle) is True
    assert inbox.process(_message(message_id="m2"), handle) is False  # redelivery, new msg id
    assert len(_effects(client, db_name)) == 1
    record = client[db_name].inbox.find_one()
    assert record["_id"] == {"consumer": "billing", "event_id": "65f000000000000000000001"}
    assert isinstance(record["processed_at"], dt.datetime)
    assert record["message_id"] == "m1"
    assert (inbox.stats.processed, inbox.stats.duplicates, inbox.stats.failed) == (1, 1, 0)


def test_a_cloudevents_message_is_recorded_with_its_type_and_deduplicated(client, db_name, inbox):
    def cloudevent(message_id: str) -> Any:
        message = _message(message_id=message_id)
        attributes = {"outbox_event_id": "65f000000000000000000001", "ce-type": "OrderPaid"}
        return SimpleNamespace(**{**vars(message), "attributes": attributes})

    handle = _record_effect(client, db_name)
    assert inbox.process(cloudevent("m1"), handle) is True
    assert inbox.process(cloudevent("m2"), handle) is False
    assert len(_effects(client, db_name)) == 1
    assert client[db_name].inbox.find_one()["type"] == "OrderPaid"


def test_another_consumer_processes_the_same_event_too(client, db_name, inbox):
    other = Inbox(client, database=db_name, consumer="shipping")
    handle = _record_effect(client, db_name)
    assert inbox.process(_message(), handle) is True
    assert other.process(_message(), handle) is True
    assert len(_effects(client, db_name)) == 2


def test_a_message_without_event_id_is_keyed_by_its_message_id(client, db_name, inbox):
    handle = _record_effect(client, db_name)
    assert inbox_id("c", _message(None, "42")) == {"consumer": "c", "event_id": "message:42"}
    assert inbox.process(_message(None, "42"), handle) is True
    assert inbox.process(_message(None, "42"), handle) is False
    assert inbox.process(_message(None, "43"), handle) is True  # weaker: a new message id
    assert len(_effects(client, db_name)) == 2


def test_a_handler_error_commits_nothing_and_a_later_success_commits_once(client, db_name, inbox):
    calls = []

    def handle(tx, message):
        calls.append(1)
        client[db_name].effects.insert_one({"n": len(calls)}, session=tx.session)
        tx.emit("Charged", {"n": len(calls)}, topic="charges", key="order-1")
        if len(calls) == 1:
            raise RuntimeError("card service down")

    with pytest.raises(RuntimeError, match="card service down"):
        inbox.process(_message(), handle)
    assert client[db_name].effects.count_documents({}) == 0
    assert client[db_name].outbox.count_documents({}) == 0
    assert client[db_name].inbox.count_documents({}) == 0
    assert inbox.process(_message(), handle) is True
    assert inbox.process(_message(), handle) is False
    assert (inbox.stats.processed, inbox.stats.duplicates, inbox.stats.failed) == (1, 1, 1)
    assert [e["n"] for e in _effects(client, db_name)] == [2]
    event = client[db_name].outbox.find_one()
    assert (event["type"], event["topic"], event["key"], event["status"]) == (
        "Charged",
        "charges",
        "order-1",
        "pending",
    )
    assert event["payload"] == b'{"n":2}'


def test_emit_in_the_handler_is_validated_like_outbox_transaction(client, db_name, inbox):
    def handle(tx, message):
        tx.emit("T", b"x", key="k" * 2000)

    with pytest.raises(Exception, match="ordering key"):
        inbox.process(_message(), handle)
    assert client[db_name].inbox.count_documents({}) == 0


def test_a_transient_error_reruns_the_transaction(client, db_name, inbox):
    """A write conflict with a concurrent transaction re-runs the handler, which commits once."""
    runs = []
    started, release = threading.Event(), threading.Event()

    def slow(tx, message):
        runs.append("slow")
        client[db_name].effects.insert_one({"by": "slow"}, session=tx.session)
        started.set()
        release.wait(10)

    worker = threading.Thread(target=inbox.process, args=(_message(), slow))
    worker.start()
    started.wait(10)
    # The same event from a second delivery, concurrently: the record insert conflicts.
    result = {}

    def fast_run():
        result["ran"] = inbox.process(_message(message_id="m2"), _record_effect(client, db_name))

    def aborted() -> int:
        return int(client.admin.command("serverStatus")["transactions"]["totalAborted"])

    before = aborted()
    fast = threading.Thread(target=fast_run)
    fast.start()
    # The second delivery's transaction has met the conflict (and is being retried).
    wait_for(lambda: aborted() > before, timeout=10)
    release.set()
    worker.join(30)
    fast.join(30)
    assert result["ran"] is False
    assert client[db_name].effects.count_documents({}) == 1


def test_consumer_must_be_named(client, db_name):
    with pytest.raises(ConfigurationError, match="consumer"):
        Inbox(client, database=db_name, consumer="")


def test_async_process_shares_the_rules(mongodb_uri, db_name):
    async def run() -> tuple[bool, bool, int]:
        client: AsyncMongoClient[Any] = AsyncMongoClient(mongodb_uri)
        try:
            box = Inbox(client, database=db_name, consumer="billing")

            async def handle(tx, message):
                await client[db_name].effects.insert_one({"e": 1}, session=tx.session)
                tx.emit("Done", b"x", topic="done")

            first = await box.process(_message(), handle)
            second = await box.process(_message(), handle)
            return first, second, await client[db_name].effects.count_documents({})
        finally:
            await client.close()

    assert asyncio.run(run()) == (True, False, 1)


def test_subscribe_with_an_async_client_says_what_to_do(mongodb_uri, db_name):
    box = Inbox(AsyncMongoClient(mongodb_uri), database=db_name, consumer="c")
    with pytest.raises(ConfigurationError, match=r"await inbox\.process"):
        box.subscribe("projects/p/subscriptions/s", lambda tx, m: None)


# -- subscribe ---------------------------------------------------------------------------------


class Running:
    """``inbox.subscribe`` in a thread, stopped on exit."""

    def __init__(self, inbox: Inbox, path: str, handler, **options) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                inbox.subscribe(path, handler, stop=self.stop, **options)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


@pytest.fixture
def acks(monkeypatch) -> dict[str, list[str]]:
    """Message ids acked and nacked by subscriber callbacks, in order (the real calls happen)."""
    seen: dict[str, list[str]] = {"ack": [], "nack": []}
    for name in ("ack", "nack"):
        real = getattr(SubscriberMessage, name)

        def spy(self, _real=real, _name=name):
            seen[_name].append(self.attributes.get("outbox_event_id", self.message_id))
            return _real(self)

        monkeypatch.setattr(SubscriberMessage, name, spy)
    return seen


def test_a_message_delivered_twice_has_one_effect_and_both_are_acked(
    client, db_name, inbox, pubsub_subscription, acks
):
    handled = []

    def handle(tx, message):
        handled.append(message.message_id)
        _record_effect(client, db_name)(tx, message)

    event = pubsub_subscription.deliver_twice(b'{"order": 1}', key="order-1")
    with Running(inbox, pubsub_subscription.path, handle):
        wait_for(lambda: client[db_name].inbox.count_documents({}) == 1, timeout=30)
        wait_for(lambda: acks["ack"] == [event, event], timeout=30)
    assert len(handled) == 1
    assert [e["event"] for e in _effects(client, db_name)] == [event]
    assert acks["nack"] == []


def test_a_nacked_message_is_redelivered_and_takes_effect_once(
    client, db_name, inbox, pubsub_subscription, acks
):
    attempts = []

    def handle(tx, message):
        attempts.append(message.attributes["outbox_event_id"])
        client[db_name].effects.insert_one({"try": len(attempts)}, session=tx.session)
        tx.emit("Forwarded", b"x", topic="next")
        if len(attempts) == 1:
            raise RuntimeError("first try fails")

    event = pubsub_subscription.publish(b"{}", key="k")
    with Running(inbox, pubsub_subscription.path, handle):
        wait_for(lambda: acks["ack"] == [event], timeout=60)
    assert acks["nack"] == [event]
    assert attempts == [event, event]
    assert [e["try"] for e in _effects(client, db_name)] == [2]
    assert client[db_name].outbox.count_documents({}) == 1


def test_ordered_subscription_keeps_each_keys_order(client, db_name, inbox, pubsub_subscription):
    sent: dict[str, list[str]] = {}
    for i in range(60):
        key = f"key-{i % 3}"
        sent.setdefault(key, []).append(pubsub_subscription.publish(b"{}", key=key))
    with Running(inbox, pubsub_subscription.path, _record_effect(client, db_name), max_messages=20):
        wait_for(lambda: client[db_name].effects.count_documents({}) == 60, timeout=60)
    seen: dict[str, list[str]] = {}
    for effect in _effects(client, db_name):
        seen.setdefault(effect["key"], []).append(effect["event"])
    assert seen == sent


def test_effects_follow_the_per_key_order_of_the_emitting_service(
    client, db_name, inbox, pubsub, relay_factory
):
    """A emits through its outbox, a relay publishes to an ordered subscription, B's inbox
    takes effect in A's per-key order."""
    topic, _ = pubsub.topic()
    _, sub = pubsub.topic_subscription(topic)
    relay_factory(db_name, default_topic=topic)
    sent: dict[str, list[str]] = {}
    for start in range(0, 300, 30):
        with outbox_transaction(client, database=db_name) as tx:
            for i in range(start, start + 30):
                key = f"order-{i % 10}"
                sent.setdefault(key, []).append(str(tx.emit("OrderPlaced", {"i": i}, key=key)))
    b = Inbox(client, database=db_name, consumer="service-b")
    with Running(b, sub.path, _record_effect(client, db_name), max_messages=25):
        wait_for(lambda: client[db_name].effects.count_documents({}) >= 300, timeout=60)
    seen: dict[str, list[str]] = {}
    for effect in _effects(client, db_name):  # _id order: commit order within a key
        seen.setdefault(effect["key"], []).append(effect["event"])
    assert seen == sent


def test_stop_finishes_the_message_in_hand(client, db_name, inbox, pubsub_subscription, acks):
    inside = threading.Event()

    def slow(tx, message):
        inside.set()
        time.sleep(1.5)
        _record_effect(client, db_name)(tx, message)

    event = pubsub_subscription.publish(b"{}")
    running = Running(inbox, pubsub_subscription.path, slow)
    with running:
        assert inside.wait(30)
        running.stop.set()  # while the handler sleeps
        running.thread.join(60)
    assert client[db_name].effects.count_documents({}) == 1
    assert acks["ack"] == [event]  # acked before subscribe returned


def test_subscribe_to_a_missing_subscription_raises(client, db_name, inbox, pubsub_project):
    with pytest.raises(Exception, match=r"(?i)not.?found|does not exist"):
        inbox.subscribe(
            f"projects/{pubsub_project}/subscriptions/nope",
            lambda tx, m: None,
            stop=threading.Event(),
        )


# -- retention ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1d12h", 129600)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7 days", "-1d", "7d!"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(ValueError, match=r"e\.g\. 7d"):
        parse_duration(text)


def test_retention_keeps_ttl_indexes_on_outbox_and_inbox(client, db_name, inbox):
    db = client[db_name]
    ensure_indexes(client, db_name, retention=dt.timedelta(days=7))
    index = db.outbox.index_information()[OUTBOX_TTL_INDEX]
    assert index["key"] == [("published_at", 1)]
    assert index["expireAfterSeconds"] == 7 * 86400
    assert index["partialFilterExpression"] == {"status": "published"}
    assert retention_of(db.inbox, "processed_at") == 7 * 86400
    ensure_indexes(client, db_name, retention=3600)  # changed in place
    assert retention_of(db.outbox, "published_at") == 3600
    assert db.inbox.index_information()[INBOX_TTL_INDEX]["expireAfterSeconds"] == 3600
    ensure_indexes(client, db_name)  # None: left as it is
    assert retention_of(db.outbox, "published_at") == 3600
    ensure_indexes(client, db_name, retention="off")
    assert OUTBOX_TTL_INDEX not in db.outbox.index_information()
    assert INBOX_TTL_INDEX not in db.inbox.index_information()


@pytest.mark.slow
def test_the_ttl_index_never_matches_a_dead_or_pending_event(client, db_name):
    db = client[db_name]
    ensure_indexes(client, db_name, retention=1)
    old = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    db.outbox.insert_many(
        [
            {"_id": 1, "status": "dead", "published_at": old},
            {"_id": 2, "status": "pending", "published_at": old},
            {"_id": 3, "status": "published", "published_at": old},
        ]
    )
    plan = db.outbox.find({"status": "dead", "published_at": {"$lt": old}}).explain()
    assert OUTBOX_TTL_INDEX not in str(plan["queryPlanner"]["winningPlan"])
    # The TTL monitor runs every 60 s by default: ask it to run now and then.
    client.admin.command({"setParameter": 1, "ttlMonitorSleepSecs": 1})
    try:
        wait_for(lambda: db.outbox.count_documents({"_id": 3}) == 0, timeout=90, interval=0.5)
    finally:
        client.admin.command({"setParameter": 1, "ttlMonitorSleepSecs": 60})
    assert sorted(d["_id"] for d in db.outbox.find()) == [1, 2]


def test_a_foreign_index_under_our_name_is_not_changed(client, db_name):
    client[db_name].outbox.create_index("published_at", name=OUTBOX_TTL_INDEX, expireAfterSeconds=9)
    with pytest.raises(ConfigurationError, match="not the one this library keeps"):
        ensure_indexes(client, db_name, retention=3600)
    assert client[db_name].outbox.index_information()[OUTBOX_TTL_INDEX]["expireAfterSeconds"] == 9


def test_another_ttl_index_on_published_at_is_refused_by_name(client, db_name):
    # Its own partial filter (or none) would delete pending or dead events on its own clock.
    outbox = client[db_name].outbox
    outbox.create_index(
        "published_at",
        name="theirs",
        expireAfterSeconds=60,
        partialFilterExpression={"published_at": {"$exists": True}},
    )
    with pytest.raises(ConfigurationError, match="theirs"):
        ensure_indexes(client, db_name, retention=3600)
    assert OUTBOX_TTL_INDEX not in outbox.index_information()


def test_a_retention_under_a_second_is_refused(client, db_name):
    with pytest.raises(ConfigurationError, match="at least one second"):
        ensure_indexes(client, db_name, retention=0.5)


@pytest.mark.parametrize("size", [5_000_000, 9_900_000])
def test_messages_up_to_pub_subs_10_mb_arrive(client, db_name, inbox, pubsub_subscription, size):
    big = pubsub_subscription.publish(b"x" * size, key="big")
    small = pubsub_subscription.publish(b"{}", key="small")

    def handle(tx, message):
        client[db_name].effects.insert_one(
            {"event": message.attributes["outbox_event_id"], "size": len(message.data)},
            session=tx.session,
        )

    with Running(inbox, pubsub_subscription.path, handle):
        wait_for(lambda: client[db_name].effects.count_documents({}) == 2, timeout=60)
    sizes = {e["event"]: e["size"] for e in _effects(client, db_name)}
    assert sizes == {big: size, small: 2}


def test_an_exactly_once_delivery_subscription_works(
    client, db_name, inbox, pubsub_emulator_host, pubsub_project
):
    from mongo_outbox.testing import EmulatorSubscription

    subscription = EmulatorSubscription(pubsub_project, ordered=False, exactly_once=True)
    try:
        sent = [subscription.publish(b"{}", key=f"k{i % 3}") for i in range(30)]
        twice = subscription.deliver_twice(b"{}")
        with Running(inbox, subscription.path, _record_effect(client, db_name)):
            wait_for(lambda: client[db_name].inbox.count_documents({}) == 31, timeout=60)
        assert sorted(e["event"] for e in _effects(client, db_name)) == sorted([*sent, twice])
    finally:
        subscription.close()


def test_a_failing_message_takes_no_neighbours_effects_with_it(
    client, db_name, inbox, pubsub_subscription, acks
):
    sent = [pubsub_subscription.publish(b"{}", key=f"k{i}") for i in range(10)]
    poison, tries = sent[4], []

    def handle(tx, message):
        event = message.attributes["outbox_event_id"]
        tries.append(event)
        _record_effect(client, db_name)(tx, message)
        if event == poison and tries.count(poison) == 1:
            raise RuntimeError("fails once")

    with Running(inbox, pubsub_subscription.path, handle, max_messages=100):
        wait_for(lambda: client[db_name].effects.count_documents({}) == 10, timeout=60)
        wait_for(lambda: len(acks["ack"]) == 10, timeout=30)
    assert sorted(e["event"] for e in _effects(client, db_name)) == sorted(sent)
    assert acks["nack"] == [poison]  # only the failing one came again
    assert tries.count(poison) == 2
    assert inbox.stats.failed == 1
