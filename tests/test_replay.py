"""Replay: published events sent again, in per-key order, marked, the outbox untouched."""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import sys
import threading
import time
import types
from collections import defaultdict
from typing import Any

import pytest
from bson import ObjectId
from helpers import run_cli

from mongo_outbox import (
    ConfigurationError,
    InMemoryPublisher,
    PermanentPublishError,
    outbox_transaction,
)
from mongo_outbox._formats import MessageFormat
from mongo_outbox._replay import Replay, ReplaySelection, parse_time
from mongo_outbox.publishers import PubSubPublisher

UTC = dt.timezone.utc


def _write(client: Any, db: str, topic: str | None, count: int, start: int = 0) -> list[ObjectId]:
    ids = []
    for n in range(start, start + count, 5):
        with outbox_transaction(client, database=db) as tx:
            for i in range(n, min(n + 5, start + count)):
                event_type = "OrderCreated" if i % 2 == 0 else "OrderPaid"
                ids.append(tx.emit(event_type, {"n": i}, topic=topic, key=f"key-{i % 4}"))
    return ids


def _publish_all(client: Any, db: str, relay_factory: Any, **config: Any) -> None:
    runner = relay_factory(db, start=False, **config)
    runner.relay.run_once()
    assert client[db].outbox.count_documents({"status": {"$ne": "published"}}) == 0


def _outbox(client: Any, db: str) -> list[dict[str, Any]]:
    return list(client[db].outbox.find().sort("_id", 1))


def _per_key(messages: list[Any]) -> dict[str, list[str]]:
    order: dict[str, list[str]] = defaultdict(list)
    for m in messages:
        order[m.ordering_key].append(m.attributes["outbox_event_id"])
    return dict(order)


def test_replay_by_type_and_by_time_range(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    first = _write(client, db_name, topic, 50)
    second = _write(client, db_name, topic, 50, start=50)
    _publish_all(client, db_name, relay_factory)
    assert len(sub.pull_until(100)) == 100
    before = _outbox(client, db_name)
    docs = {d["_id"]: d for d in before}
    publisher = PubSubPublisher(pubsub.project)
    try:
        # By type.
        sub.received.clear()
        result = Replay(
            client[db_name].outbox, publisher, ReplaySelection(types=["OrderPaid"])
        ).run()
        paid = [i for i in first + second if docs[i]["type"] == "OrderPaid"]
        assert result.published == len(paid) == 50
        assert result.last_id == paid[-1]
        got = sub.pull_until(50)
        assert all(m.attributes["outbox_replay"] == "1" for m in got)
        assert all(m.attributes["outbox_event_type"] == "OrderPaid" for m in got)
        expected = defaultdict(list)
        for i in paid:
            expected[docs[i]["key"]].append(str(i))
        assert _per_key(got) == dict(expected)
        for m in got:
            assert m.data == docs[ObjectId(m.attributes["outbox_event_id"])]["payload"]

        # By time range: from the first event of the second half (whatever shares its
        # millisecond comes too).
        sub.received.clear()
        boundary = docs[second[0]]["created_at"]
        in_range = [i for i in first + second if docs[i]["created_at"] >= boundary]
        assert set(second) <= set(in_range) < set(first + second)
        result = Replay(client[db_name].outbox, publisher, ReplaySelection(since=boundary)).run()
        assert result.published == len(in_range)
        got = sub.pull_until(len(in_range))
        expected = defaultdict(list)
        for i in in_range:
            expected[docs[i]["key"]].append(str(i))
        assert _per_key(got) == dict(expected)

        sub.received.clear()
        result = Replay(client[db_name].outbox, publisher, ReplaySelection(until=boundary)).run()
        assert result.published == 100 - len(in_range)
        assert {m.attributes["outbox_event_id"] for m in sub.pull_until(result.published)} == {
            str(i) for i in first + second if i not in in_range
        }
    finally:
        publisher.close()
    assert _outbox(client, db_name) == before  # status and bookkeeping untouched


def test_replay_in_cloudevents_to_another_topic(client, db_name, pubsub, relay_factory):
    topic, _ = pubsub.topic()
    other, sub = pubsub.topic()
    ids = _write(client, db_name, topic, 10)
    _publish_all(client, db_name, relay_factory)
    publisher = PubSubPublisher(pubsub.project)
    try:
        result = Replay(
            client[db_name].outbox,
            publisher,
            ReplaySelection(keys=["key-1"]),
            fmt=MessageFormat("urn:shop"),
            to_topic=other,
        ).run()
    finally:
        publisher.close()
    key_1 = [str(i) for n, i in enumerate(ids) if n % 4 == 1]
    assert result.published == len(key_1)
    got = sub.pull_until(len(key_1))
    assert [m.attributes["ce-id"] for m in got] == key_1
    assert {m.attributes["outbox_replay"] for m in got} == {"1"}
    assert {m.attributes["ce-source"] for m in got} == {"urn:shop"}


def test_only_published_events_are_replayed_and_ids_select(client, db_name):
    ids = _write(client, db_name, "orders", 6)
    client[db_name].outbox.update_many({"_id": {"$in": ids[:4]}}, {"$set": {"status": "published"}})
    client[db_name].outbox.update_one({"_id": ids[0]}, {"$set": {"status": "dead"}})
    publisher = InMemoryPublisher()
    replay = Replay(client[db_name].outbox, publisher, ReplaySelection(ids=ids))
    assert replay.count_by_topic() == {"orders": 3}
    assert replay.run().published == 3
    assert [m.event_id for m in publisher.messages] == ids[1:4]


def test_rate_paces_batches(client, db_name):
    ids = _write(client, db_name, "orders", 30)
    client[db_name].outbox.update_many({}, {"$set": {"status": "published"}})
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    publisher = InMemoryPublisher()
    result = Replay(
        client[db_name].outbox,
        publisher,
        ReplaySelection(ids=ids),
        rate=10,
        clock=lambda: now[0],
        sleep=sleep,
    ).run()
    assert result.published == 30
    assert publisher.calls == 3  # a second's worth at a time
    assert sleeps == [1.0, 1.0]


def test_transient_failures_are_retried_and_a_permanent_one_stops(client, db_name):
    ids = _write(client, db_name, "orders", 8)
    client[db_name].outbox.update_many({}, {"$set": {"status": "published"}})
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders", transient=True)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        publisher.heal_topic("orders")

    result = Replay(client[db_name].outbox, publisher, ReplaySelection(ids=ids), sleep=sleep).run()
    assert (result.published, result.error, len(sleeps)) == (8, None, 1)
    assert [m.event_id for m in publisher.messages] == ids

    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")
    result = Replay(client[db_name].outbox, publisher, ReplaySelection(ids=ids)).run()
    assert result.published == 0
    assert result.interrupted
    assert "refused" in str(result.error)


def test_an_unpublishable_event_is_skipped_with_its_reason(client, db_name):
    ids = _write(client, db_name, None, 3)
    client[db_name].outbox.update_many({}, {"$set": {"status": "published"}})
    client[db_name].outbox.update_one({"_id": ids[1]}, {"$set": {"payload": "not bytes"}})
    publisher = InMemoryPublisher()
    result = Replay(
        client[db_name].outbox, publisher, ReplaySelection(ids=ids), default_topic="orders"
    ).run()
    assert result.published == 2
    assert result.skipped == 1
    assert "payload" in result.skipped_reasons[0]
    assert str(ids[1]) in result.skipped_reasons[0]
    result = Replay(client[db_name].outbox, InMemoryPublisher(), ReplaySelection(ids=ids)).run()
    assert result.skipped == 3
    assert "--default-topic or --to-topic" in result.skipped_reasons[0]


def test_a_selector_is_required():
    with pytest.raises(ConfigurationError, match="needs a selector"):
        ReplaySelection()
    with pytest.raises(ConfigurationError, match="--since must be before --until"):
        ReplaySelection(
            since=dt.datetime(2026, 1, 2, tzinfo=UTC), until=dt.datetime(2026, 1, 1, tzinfo=UTC)
        )


def test_parse_time():
    now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_time("2h", now) == dt.datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert parse_time("1d12h", now) == dt.datetime(2026, 11, 27, 0, 0, tzinfo=UTC)
    assert parse_time("2026-11-28T09:30:00Z") == dt.datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
    assert parse_time("2026-11-28T09:30:00") == dt.datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
    assert parse_time("2026-11-28T10:30:00+01:00") == dt.datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
    assert parse_time("2026-11-28") == dt.datetime(2026, 11, 28, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither an ISO 8601 time"):
        parse_time("yesterday")


# -- the command -------------------------------------------------------------------------------


def _cli(monkeypatch, capsys, *argv: str, **env: str) -> tuple[int, str, str]:
    for name in [n for n in os.environ if n.startswith("MONGO_OUTBOX_") and "REQUIRE" not in n]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return run_cli(list(argv), capsys)


@pytest.fixture
def published(client, db_name, pubsub, relay_factory, mongodb_uri):
    """20 published events on a fresh topic; the subscription has been drained."""
    topic, sub = pubsub.topic()
    ids = _write(client, db_name, topic, 20)
    _publish_all(client, db_name, relay_factory)
    sub.pull_until(20)
    sub.received.clear()
    flags = ["--mongo-uri", mongodb_uri, "--database", db_name, "--project", pubsub.project]
    return types.SimpleNamespace(topic=topic, sub=sub, ids=ids, flags=flags)


def test_replay_command_by_type(client, db_name, published, monkeypatch, capsys):
    before = _outbox(client, db_name)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code, out, err = _cli(monkeypatch, capsys, "replay", *published.flags, "--type", "OrderPaid")
    assert (code, err) == (0, "")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert out.startswith("replayed 10 events (")
    got = published.sub.pull_until(10)
    assert {m.attributes["outbox_event_type"] for m in got} == {"OrderPaid"}
    assert {m.attributes["outbox_replay"] for m in got} == {"1"}
    assert _outbox(client, db_name) == before


def test_replay_dry_run_counts_and_publishes_nothing(published, monkeypatch, capsys):
    code, out, _ = _cli(
        monkeypatch, capsys, "replay", *published.flags, "--since", "1h", "--dry-run"
    )
    assert code == 0
    assert out == f"would replay 20 events: {published.topic} 20\n"
    assert published.sub.drain_quietly() == []


def test_replay_in_cloudevents_from_the_environment(published, monkeypatch, capsys):
    code, _, _ = _cli(
        monkeypatch,
        capsys,
        "replay",
        *published.flags,
        "--key",
        "key-2",
        "--cloudevents-source",
        "urn:shop",
        MONGO_OUTBOX_MESSAGE_FORMAT="cloudevents",
    )
    assert code == 0
    got = published.sub.pull_until(5)
    assert [m.attributes["ce-id"] for m in got] == [str(i) for i in published.ids[2::4]]
    assert {m.attributes["ce-source"] for m in got} == {"urn:shop"}


def test_relay_command_publishes_cloudevents(
    client, db_name, pubsub, mongodb_uri, monkeypatch, capsys
):
    topic, sub = pubsub.topic()
    ids = _write(client, db_name, topic, 3)
    flags = ["--mongo-uri", mongodb_uri, "--database", db_name, "--project", pubsub.project]
    code, _, err = _cli(
        monkeypatch, capsys, "relay", *flags, "--once", "--message-format", "cloudevents"
    )
    assert code == 0, err
    got = sub.pull_until(3)
    assert [m.attributes["ce-id"] for m in got] == [str(i) for i in ids]
    assert {m.attributes["ce-source"] for m in got} == {f"mongo-outbox://{db_name}/outbox"}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "needs a selector"),
        (["--since", "yesterday"], "neither an ISO 8601 time"),
        (["--since", "1h", "--until", "2h"], "--since must be before --until"),
        (["--type", "T", "--cloudevents-source", "urn:x"], "applies only to --message-format"),
        (["--type", "T", "--message-format", "xml"], "'xml' is not one of"),
        (["--type", "T", "--rate", "0"], "must be positive"),
        (["--type", "T", "--to-topic", "no spaces"], "invalid topic 'no spaces'"),
        (["--after", "xyz"], "'xyz' is not a valid ObjectId"),
        (["--type", "T", "--default-topic", "goog-x"], "invalid topic 'goog-x'"),
    ],
)
def test_bad_replay_settings_exit_2_before_connecting(argv, match, monkeypatch, capsys):
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "replay",
        "--mongo-uri",
        "mongodb://127.0.0.1:1",
        "--database",
        "d",
        "--project",
        "p",
        *argv,
    )
    assert code == 2
    assert match in err
    assert len(err.strip().splitlines()) == 1


def test_replay_of_a_missing_outbox_exits_2(mongodb_uri, outbox_database, monkeypatch, capsys):
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "replay",
        "--mongo-uri",
        mongodb_uri,
        "--database",
        outbox_database,
        "--type",
        "T",
        "--dry-run",
    )
    assert code == 2
    assert "no outbox collection" in err


def test_progress_is_drawn_on_a_terminal(published, monkeypatch, capsys):
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", terminal)
    code, out, _ = _cli(monkeypatch, capsys, "replay", *published.flags, "--since", "1h")
    assert code == 0
    assert "\rreplayed 20 of 20 events (" in terminal.getvalue()
    assert terminal.getvalue().endswith("\n")
    assert out.startswith("replayed 20 events")


def test_a_time_range_is_read_through_the_status_id_index(client, db_name):
    _write(client, db_name, "orders", 10)
    since = dt.datetime.now(UTC) - dt.timedelta(minutes=5)
    query = ReplaySelection(since=since).query()
    plan = client[db_name].outbox.find(query).sort("_id", 1).explain()["queryPlanner"]
    stage = plan["winningPlan"]
    while "inputStage" in stage:
        if stage.get("stage") == "IXSCAN":
            break
        stage = stage["inputStage"]
    assert stage["stage"] == "IXSCAN"
    assert stage["keyPattern"] == {"status": 1, "_id": 1}
    assert stage["indexBounds"]["_id"] != ["[MinKey, MaxKey]"]


def test_times_outside_the_object_id_range_select_by_created_at_alone():
    old = ReplaySelection(since=dt.datetime(1900, 1, 1, tzinfo=UTC)).query()
    assert "_id" not in old
    assert old["created_at"] == {"$gte": dt.datetime(1900, 1, 1, tzinfo=UTC)}
    far = ReplaySelection(
        since=dt.datetime(2026, 1, 1, tzinfo=UTC), until=dt.datetime(2200, 1, 1, tzinfo=UTC)
    ).query()
    assert set(far["_id"]) == {"$gte"}
    with pytest.raises(ValueError, match="before the year 1"):
        parse_time("99999999d")
    assert parse_time("2026-11-28T09:30:00z") == dt.datetime(2026, 11, 28, 9, 30, tzinfo=UTC)


def test_replay_everything_since_an_old_date(published, monkeypatch, capsys):
    code, out, _ = _cli(
        monkeypatch, capsys, "replay", *published.flags, "--since", "1900-01-01", "--dry-run"
    )
    assert (code, out) == (0, f"would replay 20 events: {published.topic} 20\n")


def test_a_dry_run_makes_no_publisher(published, monkeypatch, capsys):
    def no_publisher(*args, **kwargs):
        raise AssertionError("a dry run must not need Pub/Sub (nor credentials)")

    monkeypatch.setattr("mongo_outbox.publishers.PubSubPublisher", no_publisher)
    flags = published.flags[: published.flags.index("--project")]
    code, out, err = _cli(monkeypatch, capsys, "replay", *flags, "--type", "OrderPaid", "--dry-run")
    assert (code, err) == (0, "")
    assert out.startswith("would replay 10 events")


def test_skipped_events_make_the_replay_exit_1(client, db_name, published, monkeypatch, capsys):
    client[db_name].outbox.update_one({"_id": published.ids[3]}, {"$set": {"payload": "text"}})
    code, out, err = _cli(monkeypatch, capsys, "replay", *published.flags, "--since", "1h")
    assert code == 1
    assert out.startswith("replayed 19 events")
    assert str(published.ids[3]) in err
    assert "replay incomplete: skipped 1 event that cannot be published" in err


@pytest.mark.parametrize("rate", ["inf", "nan"])
def test_a_rate_must_be_finite(rate, monkeypatch, capsys):
    code, _, err = _cli(
        monkeypatch, capsys, "replay", "--database", "d", "--type", "T", "--rate", rate
    )
    assert code == 2
    assert "is not a finite number" in err


def test_stop_cuts_a_rate_wait_short(client, db_name):
    ids = _write(client, db_name, "orders", 2)
    client[db_name].outbox.update_many({}, {"$set": {"status": "published"}})
    stop = threading.Event()
    replay = Replay(
        client[db_name].outbox,
        InMemoryPublisher(),
        ReplaySelection(ids=ids),
        rate=0.001,  # the second event would wait 1,000 s
        on_progress=lambda done, total: threading.Timer(0.1, stop.set).start(),
    )
    started = time.monotonic()
    result = replay.run(stop)
    assert time.monotonic() - started < 30
    assert (result.published, result.interrupted) == (1, True)


def test_after_goes_on_from_the_last_replayed_event(client, db_name):
    ids = _write(client, db_name, "orders", 10)
    client[db_name].outbox.update_many({}, {"$set": {"status": "published"}})
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")  # permanent: the replay stops at once
    first = Replay(client[db_name].outbox, publisher, ReplaySelection(after=ids[3])).run()
    assert first.failure is not None  # nothing went out, so there is nothing to go on after
    assert first.failure.startswith("replay stopped, publishing failed")
    assert "--after" not in first.failure
    healed = InMemoryPublisher()
    result = Replay(client[db_name].outbox, healed, ReplaySelection(after=ids[3])).run()
    assert [m.event_id for m in healed.messages] == ids[4:]
    assert result.last_id == ids[-1]


def test_a_stopped_replay_says_how_to_go_on(published, monkeypatch, capsys):
    calls = []

    def publish_then_fail(self, messages, *, timeout=None):
        calls.append(len(messages))
        if len(calls) > 1:
            return [PermanentPublishError("refused")] * len(messages)
        return [None] * len(messages)

    monkeypatch.setattr("mongo_outbox.publishers.PubSubPublisher.publish", publish_then_fail)
    code, _, err = _cli(
        monkeypatch, capsys, "replay", *published.flags, "--since", "1h", "--rate", "5"
    )
    assert code == 1
    last = published.ids[4]
    assert f"the last replayed event is {last}: rerun with --after {last} to go on" in err
    code, out, _ = _cli(
        monkeypatch, capsys, "replay", *published.flags, "--after", str(last), "--dry-run"
    )
    assert (code, out) == (0, f"would replay 15 events: {published.topic} 15\n")


def test_a_replay_to_a_missing_topic_names_replay_fixes_only(published, monkeypatch, capsys):
    code, _, err = _cli(
        monkeypatch,
        capsys,
        "replay",
        *published.flags,
        "--since",
        "1h",
        "--to-topic",
        "no-such-topic-for-replay",
    )
    assert code == 1
    assert "does not exist" in err
    assert "requeue" not in err  # the relay's advice for dead events, not replay's
