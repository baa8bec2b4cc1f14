"""Unit tests of the relay's pure decisions (``mongo_outbox.relay._ordering``)."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from bson import ObjectId

from mongo_outbox import Message, PermanentPublishError, TransientPublishError, _retry
from mongo_outbox._document import Event, key_of, to_event
from mongo_outbox._retry import Backoff
from mongo_outbox._store import Failure
from mongo_outbox._times import as_utc
from mongo_outbox.relay._ordering import SweepFilter, classify

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 4, 12, 0, 0, tzinfo=UTC)
OLD = NOW - dt.timedelta(minutes=10)


def _doc(key=None, *, created=OLD, next_at=None, attempts=0):
    doc = {"_id": ObjectId(), "key": key, "created_at": created, "attempts": attempts}
    if next_at is not None:
        doc["next_attempt_at"] = next_at
    return doc


def _admitted(filt, docs):
    return [doc["_id"] for doc in docs if filt.admit(doc)]


def _ids(docs):
    return [doc["_id"] for doc in docs]


# -- helpers ---------------------------------------------------------------------------------


def test_key_of():
    assert key_of({"key": "k"}) == "k"
    assert key_of({"key": ""}) is None
    assert key_of({"key": 5}) is None
    assert key_of({}) is None


def test_as_utc():
    naive = dt.datetime(2026, 1, 1, 0, 0)
    assert as_utc(naive) == dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert as_utc(NOW) is NOW


# -- SweepFilter -----------------------------------------------------------------------------


def test_not_due_event_holds_its_key_and_later_events_of_it():
    failed = _doc("k", next_at=NOW + dt.timedelta(seconds=30), attempts=1)
    later_same = _doc("k")
    other = _doc("j")
    keyless = _doc(None)
    filt = SweepFilter(NOW, grace=None)
    assert _admitted(filt, [failed, later_same, other, keyless]) == _ids([other, keyless])
    assert filt.held == {"k"}
    assert filt.waiting == {"k"}


def test_due_failed_event_is_admitted_and_does_not_hold_its_key():
    due = _doc("k", next_at=NOW - dt.timedelta(seconds=1), attempts=2)
    later = _doc("k")
    filt = SweepFilter(NOW, grace=None)
    assert _admitted(filt, [due, later]) == _ids([due, later])
    assert filt.held == set()


def test_next_attempt_exactly_now_is_due():
    filt = SweepFilter(NOW, grace=None)
    assert filt.admit(_doc("k", next_at=NOW, attempts=1))


def test_keyless_not_due_event_holds_nothing():
    waiting = _doc(None, next_at=NOW + dt.timedelta(minutes=1), attempts=1)
    later = _doc(None)
    filt = SweepFilter(NOW, grace=None)
    assert _admitted(filt, [waiting, later]) == _ids([later])
    assert filt.held == set()
    assert filt.waiting == set()


def test_grace_leaves_young_events_to_the_change_stream():
    old = _doc("a")
    young = _doc("k", created=NOW - dt.timedelta(seconds=1))
    young_later = _doc("k", created=NOW - dt.timedelta(milliseconds=500))
    young_keyless = _doc(None, created=NOW - dt.timedelta(seconds=1))
    old_other = _doc("b")
    filt = SweepFilter(NOW, grace=5.0)
    docs = [old, young, young_later, young_keyless, old_other]
    assert _admitted(filt, docs) == _ids([old, old_other])
    assert filt.held == {"k"}
    assert filt.waiting == set()  # young events are not "waiting": the stream will bring them


def test_grace_boundary():
    filt = SweepFilter(NOW, grace=5.0)
    assert filt.admit(_doc("a", created=NOW - dt.timedelta(seconds=5)))
    assert not filt.admit(_doc("b", created=NOW - dt.timedelta(seconds=4.999)))


def test_old_event_after_a_young_one_of_its_key_waits_too():
    # Per-key order beats age: once a key is held, nothing later of it passes.
    filt = SweepFilter(NOW, grace=5.0)
    assert not filt.admit(_doc("k", created=NOW))
    assert not filt.admit(_doc("k", created=OLD))


def test_grace_does_not_apply_to_blocked_keys():
    young_blocked = _doc("blocked", created=NOW - dt.timedelta(seconds=1))
    young_free = _doc("free", created=NOW - dt.timedelta(seconds=1))
    filt = SweepFilter(NOW, grace=5.0, blocked=["blocked"])
    assert _admitted(filt, [young_blocked, young_free]) == _ids([young_blocked])
    assert filt.blocked == frozenset({"blocked"})


def test_blocked_key_still_waits_for_a_not_due_event():
    failed = _doc("blocked", next_at=NOW + dt.timedelta(seconds=10), attempts=1)
    later = _doc("blocked", created=NOW)
    filt = SweepFilter(NOW, grace=5.0, blocked={"blocked"})
    assert _admitted(filt, [failed, later]) == []
    assert filt.waiting == {"blocked"}


def test_grace_does_not_apply_to_events_that_failed_before():
    retried = _doc("k", created=NOW - dt.timedelta(seconds=1), next_at=NOW, attempts=1)
    filt = SweepFilter(NOW, grace=5.0)
    assert filt.admit(retried)


def test_no_grace_admits_every_due_event():
    young = _doc("k", created=NOW)
    young_keyless = _doc(None, created=NOW + dt.timedelta(seconds=1))
    not_due = _doc("j", next_at=NOW + dt.timedelta(seconds=1), attempts=1)
    filt = SweepFilter(NOW, grace=None)
    assert filt.young_after is None
    assert _admitted(filt, [young, young_keyless, not_due]) == _ids([young, young_keyless])


def test_event_without_created_at_is_not_treated_as_young():
    doc = {"_id": ObjectId(), "key": "k"}
    assert SweepFilter(NOW, grace=5.0).admit(doc)


def test_naive_datetimes_are_taken_as_utc():
    naive_now = NOW.replace(tzinfo=None)
    not_due = _doc("k", next_at=naive_now + dt.timedelta(seconds=30), attempts=1)
    due = _doc("d", next_at=naive_now - dt.timedelta(seconds=30), attempts=1)
    young = _doc("y", created=naive_now - dt.timedelta(seconds=1))
    old = _doc("o", created=naive_now - dt.timedelta(minutes=1))
    filt = SweepFilter(NOW, grace=5.0)
    assert _admitted(filt, [not_due, due, young, old]) == _ids([due, old])
    assert filt.held == {"k", "y"}
    assert filt.waiting == {"k"}


# -- classify --------------------------------------------------------------------------------


def _sent(*keys, attempts=0):
    return [Event(Message(ObjectId(), "orders", b"{}", key, {}), attempts, 2) for key in keys]


def _classify(sent, results, retry_initial=1.0, retry_max=60.0, **kwargs):
    options = {"now": NOW, "max_attempts": 5, "retry": Backoff(retry_initial, retry_max)}
    options.update(kwargs)
    return classify(sent, results, **options)


def test_all_published():
    sent = _sent("a", None, "a", "b")
    outcome = _classify(sent, [None] * 4)
    assert outcome.published == [e.message.event_id for e in sent]
    assert outcome.failures == []
    assert outcome.retry == []
    assert outcome.blocked == set()
    assert outcome.dead == 0


def test_results_must_match_messages():
    with pytest.raises(ValueError, match="zip"):
        _classify(_sent("a", "b"), [None])


def test_transient_error_retries_the_event_and_later_events_of_its_key():
    sent = _sent("k", "j", "k", None, "k")
    paused = TransientPublishError("paused")
    results = [TransientPublishError("unavailable"), None, paused, None, None]
    outcome = _classify(sent, results)
    assert outcome.retry == [sent[0], sent[2], sent[4]]
    assert outcome.published == [sent[1].message.event_id, sent[3].message.event_id]
    assert outcome.failures == []  # transient errors do not count attempts
    assert outcome.blocked == set()
    assert outcome.dead == 0


def test_transient_error_on_a_keyless_event_retries_only_it():
    sent = _sent(None, None)
    outcome = _classify(sent, [TransientPublishError("x"), None])
    assert outcome.retry == [sent[0]]
    assert outcome.published == [sent[1].message.event_id]


def test_permanent_error_counts_an_attempt_and_blocks_the_key():
    sent = _sent("k", "j", "k", "k", attempts=2)
    error = PermanentPublishError("topic orders refused")
    results = [error, None, TransientPublishError("held behind"), None]
    outcome = _classify(sent, results, max_attempts=5, retry_initial=1.0, retry_max=60.0)
    assert outcome.published == [sent[1].message.event_id]
    assert outcome.retry == []
    assert outcome.blocked == {"orders\nk"}
    assert outcome.dead == 0
    assert len(outcome.failures) == 1
    failure = outcome.failures[0]
    assert isinstance(failure, Failure)
    assert failure.event_id == sent[0].message.event_id
    assert failure.attempts == 3
    assert failure.error == "topic orders refused"
    # Third failure: backoff 1 * 2**2 = 4 s, jittered into [2, 4].
    assert failure.next_attempt_at is not None
    delay = (failure.next_attempt_at - NOW).total_seconds()
    assert 2.0 <= delay <= 4.0


@pytest.mark.parametrize("jitter", [0.5, 1.0])
def test_permanent_error_backoff_bounds(monkeypatch, jitter):
    monkeypatch.setattr(_retry.random, "uniform", lambda a, b: a if jitter == 0.5 else b)
    sent = _sent("k", attempts=0)
    outcome = _classify(sent, [PermanentPublishError("no")], retry_initial=2.0)
    failure = outcome.failures[0]
    assert failure.attempts == 1
    assert failure.next_attempt_at == NOW + dt.timedelta(seconds=2.0 * jitter)


def test_last_attempt_makes_the_event_dead():
    sent = _sent("k", "k", "j", attempts=4)
    results = [PermanentPublishError("bad"), TransientPublishError("paused"), None]
    outcome = _classify(sent, results, max_attempts=5)
    assert outcome.dead == 1
    assert outcome.failures == [Failure(sent[0].message.event_id, 5, "bad", None)]
    # A dead event no longer holds its key back.
    assert outcome.blocked == set()
    assert outcome.retry == [sent[1]]
    assert outcome.published == [sent[2].message.event_id]


def test_attempts_beyond_max_are_dead_too():
    sent = _sent("k", attempts=9)
    outcome = _classify(sent, [PermanentPublishError("bad")], max_attempts=3)
    assert outcome.dead == 1
    assert outcome.failures[0].next_attempt_at is None
    assert outcome.failures[0].attempts == 10


def test_max_attempts_one_makes_the_first_failure_dead():
    outcome = _classify(_sent(None), [PermanentPublishError("bad")], max_attempts=1)
    assert outcome.dead == 1
    assert outcome.failures[0].attempts == 1


def test_keyless_events_never_wait():
    sent = _sent(None, None, None)
    results = [PermanentPublishError("bad"), None, PermanentPublishError("bad")]
    outcome = _classify(sent, results)
    assert outcome.blocked == set()
    assert outcome.published == [sent[1].message.event_id]
    assert [f.event_id for f in outcome.failures] == [
        sent[0].message.event_id,
        sent[2].message.event_id,
    ]
    assert all(f.next_attempt_at is not None and f.next_attempt_at > NOW for f in outcome.failures)


def test_each_key_is_independent():
    sent = _sent("a", "b", "a", "b", "c")
    results = [
        PermanentPublishError("a down"),
        TransientPublishError("b slow"),
        TransientPublishError("paused"),
        TransientPublishError("paused"),
        None,
    ]
    outcome = _classify(sent, results)
    assert outcome.blocked == {"orders\na"}
    assert outcome.retry == [sent[1], sent[3]]
    assert outcome.published == [sent[4].message.event_id]
    assert [f.event_id for f in outcome.failures] == [sent[0].message.event_id]


def test_odd_attempts_value_counts_from_zero():
    doc = {
        "_id": ObjectId(),
        "type": "T",
        "topic": "orders",
        "key": "k",
        "payload": b"",
        "created_at": NOW,
        "attempts": "many",
    }
    event = to_event(doc, None)
    assert isinstance(event, Event)
    outcome = _classify([event], [PermanentPublishError("x")])
    assert outcome.failures[0].attempts == 1


# -- Backoff -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "initial", "maximum", "base"),
    [
        (0, 1.0, 300.0, 1.0),
        (1, 1.0, 300.0, 1.0),
        (2, 1.0, 300.0, 2.0),
        (5, 0.5, 300.0, 8.0),
        (9, 1.0, 300.0, 256.0),
        (10, 1.0, 300.0, 300.0),
        (60, 1.0, 300.0, 300.0),
    ],
)
def test_backoff_bounds(attempts, initial, maximum, base):
    delays = [Backoff(initial, maximum).delay(attempts) for _ in range(200)]
    assert all(0.5 * base <= d <= base for d in delays)
    assert max(delays) - min(delays) > 0  # jittered, not constant


def test_backoff_is_capped_for_huge_attempt_counts():
    # 2.0 ** 1999 would overflow a float; the delay must still be capped at the maximum.
    for attempts in (1025, 2000, 10**6):
        assert 150.0 <= Backoff(1.0, 300.0).delay(attempts) <= 300.0


def test_retrying_retries_what_it_is_told_then_returns():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "done"

    retrying = Backoff(0.001, 0.002).retrying(threading.Event(), ConnectionError)
    assert retrying(flaky) == "done"
    assert len(calls) == 3


def test_retrying_raises_at_once_what_it_is_not_told_to_retry():
    calls = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        Backoff(0.001, 0.002).retrying(threading.Event(), ConnectionError)(broken)
    assert len(calls) == 1


def test_retrying_gives_up_after_its_limit_with_the_last_error():
    def down() -> None:
        raise ConnectionError("down")

    started = time.monotonic()
    with pytest.raises(ConnectionError, match="down"):
        Backoff(0.01, 0.01).retrying(threading.Event(), ConnectionError, give_up_after=0.2)(down)
    assert 0.2 <= time.monotonic() - started < 5


def test_a_stop_cuts_a_retry_wait_short():
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        Backoff(60.0, 60.0).retrying(stop, ConnectionError)(_always_down)
    assert time.monotonic() - started < 5  # not the 30-60 s wait
    assert Backoff(60.0, 60.0).pause(1, stop)  # already stopped: no wait at all


def _always_down() -> None:
    raise ConnectionError("down")


# -- ordering slots: a key on a topic -------------------------------------------------------


# -- ordering lanes: a key on a topic -------------------------------------------------------


def test_lane_is_the_key_on_its_topic_with_the_default_applied():
    from mongo_outbox._document import lane_of
    from mongo_outbox._message import message_lane

    assert lane_of({"key": "k", "topic": "a"}, "dflt") == "a\nk"
    assert lane_of({"key": "k", "topic": None}, "dflt") == "dflt\nk"
    assert lane_of({"key": None, "topic": "a"}, "dflt") is None
    assert lane_of({"key": "k", "topic": "a"}, None) != lane_of({"key": "k", "topic": "b"}, None)
    doc = {"_id": ObjectId(), "key": "k", "topic": None}
    message = Message(doc["_id"], "dflt", b"", "k", {})
    assert message_lane(message) == lane_of(doc, "dflt")
    assert message_lane(Message(doc["_id"], "dflt", b"", None, {})) is None
