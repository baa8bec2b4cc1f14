"""Unit tests of the relay's small parts, each on its own with fakes (no MongoDB, no Pub/Sub).

Covers ``BudgetQueue``, ``KeyGate``/``TopicBreaker``, ``StreamSweepDedup``, decoding,
``Checkpoint``, ``Dispatcher`` and ``PubSubPublisher`` (on a fake GAPIC client).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
import types
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import bson
import pytest
from bson import ObjectId, Timestamp
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument
from google.api_core import exceptions as gexc
from helpers import invalid_utf8

from mongo_outbox import (
    LeaseLostError,
    Message,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
    _retry,
)
from mongo_outbox._document import (
    Event,
    Poison,
    build_document,
    decode_batch,
    decode_document,
    to_event,
)
from mongo_outbox._message import message_lane
from mongo_outbox._retry import Backoff
from mongo_outbox._store import Failure
from mongo_outbox._times import utcnow
from mongo_outbox.publishers import InMemoryPublisher, PubSubPublisher
from mongo_outbox.relay import _checkpoint
from mongo_outbox.relay._budget import BudgetQueue, ByteBudget
from mongo_outbox.relay._checkpoint import Checkpoint
from mongo_outbox.relay._config import RelayConfig
from mongo_outbox.relay._dedup import StreamSweepDedup
from mongo_outbox.relay._dispatch import Dispatcher
from mongo_outbox.relay._gate import KeyGate, TopicBreaker
from mongo_outbox.relay._publishing import FencedPublisher
from mongo_outbox.relay._stats import RelayStats

# A generous bound for anything that must happen "soon" (never hit when the code is right).
WAIT = 5.0


def _run(target, *args):
    """Run ``target(*args)`` in a daemon thread; return (thread, done event, result box)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def body():
        try:
            box["result"] = target(*args)
        finally:
            done.set()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, done, box


# == BudgetQueue =============================================================================


def test_budget_queue_refuses_non_positive_budgets():
    with pytest.raises(ValueError, match="positive"):
        BudgetQueue(0, 10)
    with pytest.raises(ValueError, match="positive"):
        BudgetQueue(10, 0)


def test_budget_put_waits_for_bytes_until_a_take_frees_room():
    q: BudgetQueue[str] = BudgetQueue(max_bytes=10, max_items=100)
    assert q.put("a", 6, timeout=1)
    assert not q.put("b", 6, timeout=0)  # 6 + 6 > 10: no room now
    thread, done, box = _run(q.put, "b", 6, WAIT)
    assert not done.wait(0.05), "put went through although the byte budget is full"
    assert q.take(1, 100, timeout=1) == ["a"]
    assert done.wait(WAIT), "put did not wake up when take freed room"
    thread.join(WAIT)
    assert box["result"] is True
    assert q.take(10, 100, timeout=1) == ["b"]
    assert q.bytes == 0


def test_queues_sharing_a_budget_hold_its_bytes_together():
    budget = ByteBudget(10)
    a: BudgetQueue[str] = BudgetQueue(10, 100, budget)
    b: BudgetQueue[str] = BudgetQueue(10, 100, budget)
    assert a.put("a1", 8, timeout=1)
    # b is empty, but the budget is not: a big item waits, whatever queue it goes to.
    assert not b.put("b1", 8, timeout=0)
    thread, done, box = _run(b.put, "b1", 8, WAIT)
    assert not done.wait(0.05), "put went through although the shared budget is full"
    assert a.take(1, 100, timeout=1) == ["a1"]
    assert done.wait(WAIT), "put did not wake up when another queue freed the budget"
    thread.join(WAIT)
    assert box["result"] is True
    assert budget.used == 8
    # An item bigger than the whole budget goes in once the budget is empty: nothing stalls.
    assert b.take(1, 100, timeout=1) == ["b1"]
    assert a.put("huge", 50, timeout=0)
    assert budget.used == 50


def test_budget_put_waits_for_items_until_a_take_frees_room():
    q: BudgetQueue[str] = BudgetQueue(max_bytes=1_000, max_items=2)
    assert q.put("a", 1, timeout=1)
    assert q.put("b", 1, timeout=1)
    assert not q.put("c", 1, timeout=0)
    thread, done, box = _run(q.put, "c", 1, WAIT)
    assert not done.wait(0.05), "put went through although the item budget is full"
    assert q.take(1, 1_000, timeout=1) == ["a"]
    assert done.wait(WAIT)
    thread.join(WAIT)
    assert box["result"] is True
    assert len(q) == 2
    assert q.take(10, 1_000, timeout=1) == ["b", "c"]


def test_budget_put_times_out_with_false_when_no_room_comes():
    q: BudgetQueue[str] = BudgetQueue(max_bytes=10, max_items=10)
    assert q.put("a", 10, timeout=1)
    started = time.monotonic()
    assert q.put("b", 1, timeout=0.05) is False
    assert time.monotonic() - started >= 0.04
    assert len(q) == 1
    assert q.bytes == 10


def test_budget_item_larger_than_the_budget_is_admitted_into_an_empty_queue():
    q: BudgetQueue[str] = BudgetQueue(max_bytes=10, max_items=10)
    assert q.put("big", 100, timeout=0)  # no deadlock: the queue is empty
    assert q.bytes == 100
    assert not q.put("small", 1, timeout=0)  # but nothing joins it while it is over budget
    assert q.take(10, 10, timeout=1) == ["big"]
    assert q.bytes == 0
    assert q.put("small", 1, timeout=0)


def test_budget_take_respects_max_items_and_max_bytes_but_returns_at_least_one():
    q: BudgetQueue[int] = BudgetQueue(max_bytes=1_000, max_items=100)
    for i in range(6):
        assert q.put(i, 4, timeout=1)
    assert q.take(2, 1_000, timeout=1) == [0, 1]
    assert q.take(100, 8, timeout=1) == [2, 3]  # 4 + 4 fits 8; a third would not
    assert q.take(100, 1, timeout=1) == [4]  # over max_bytes alone, still one item
    assert q.take(100, 7, timeout=1) == [5]
    assert len(q) == 0
    assert q.bytes == 0


def test_budget_take_times_out_with_an_empty_list():
    q: BudgetQueue[int] = BudgetQueue(max_bytes=10, max_items=10)
    started = time.monotonic()
    assert q.take(10, 10, timeout=0.05) == []
    assert time.monotonic() - started >= 0.04
    assert q.take(10, 10, timeout=0) == []


def test_budget_take_wakes_up_when_an_item_arrives():
    q: BudgetQueue[str] = BudgetQueue(max_bytes=10, max_items=10)
    thread, done, box = _run(q.take, 10, 10, WAIT)
    assert not done.wait(0.02)
    assert q.put("x", 3, timeout=1)
    assert done.wait(WAIT)
    thread.join(WAIT)
    assert box["result"] == ["x"]
    assert q.bytes == 0


def test_budget_is_fifo_and_byte_accounting_returns_to_zero():
    q: BudgetQueue[int] = BudgetQueue(max_bytes=10_000, max_items=1_000)
    sizes = [i % 7 + 1 for i in range(50)]
    for i, size in enumerate(sizes):
        assert q.put(i, size, timeout=1)
    assert q.bytes == sum(sizes)
    assert len(q) == 50
    out: list[int] = []
    while len(q):
        before = q.bytes
        got = q.take(3, 9, timeout=1)
        assert got
        assert before - q.bytes == sum(sizes[i] for i in got)
        out.extend(got)
    assert out == list(range(50))
    assert q.bytes == 0


def test_budget_producer_and_consumer_threads_keep_order_within_the_budget():
    q: BudgetQueue[int] = BudgetQueue(max_bytes=20, max_items=4)
    n = 300
    peak = {"bytes": 0, "items": 0}

    def produce():
        for i in range(n):
            assert q.put(i, 5, timeout=WAIT)

    thread, done, _ = _run(produce)
    out: list[int] = []
    deadline = time.monotonic() + WAIT
    while len(out) < n and time.monotonic() < deadline:
        peak["bytes"] = max(peak["bytes"], q.bytes)
        peak["items"] = max(peak["items"], len(q))
        out.extend(q.take(3, 100, timeout=0.5))
    assert done.wait(WAIT)
    thread.join(WAIT)
    assert out == list(range(n))
    assert peak["bytes"] <= 20
    assert peak["items"] <= 4
    assert q.bytes == 0


# == KeyGate =================================================================================


def test_key_gate_hold_replace_and_held():
    gate = KeyGate()
    assert gate.admits("t\nk")
    assert gate.admits(None)
    gate.hold(["t\nk", "t\nj"])
    assert not gate.admits("t\nk")
    assert not gate.admits("t\nj")
    assert gate.admits("u\nk")
    assert gate.admits(None)  # events without a key never wait
    assert gate.held == frozenset({"t\nk", "t\nj"})
    assert len(gate) == 2
    gate.hold(["t\nk"])
    assert len(gate) == 2
    gate.replace(["u\nk"])
    assert gate.held == frozenset({"u\nk"})
    assert gate.admits("t\nk")
    assert not gate.admits("u\nk")
    gate.replace(())
    assert len(gate) == 0
    assert gate.admits("u\nk")


def test_key_gate_held_is_a_snapshot():
    gate = KeyGate()
    gate.hold(["a"])
    snapshot = gate.held
    gate.hold(["b"])
    assert snapshot == frozenset({"a"})


# == TopicBreaker ============================================================================


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fixed_jitter(monkeypatch):
    """Every backoff delay at 75% of its base."""
    monkeypatch.setattr(_retry.random, "uniform", lambda a, b: 0.75)


def test_breaker_isolates_only_after_isolate_after_seconds_of_failing(fixed_jitter):
    clock = FakeClock()
    breaker = TopicBreaker(1.0, Backoff(2.0, 60.0), clock=clock)
    assert breaker.allows("a")
    assert breaker.failed("a") is False
    clock.advance(0.5)
    assert breaker.failed("a") is False
    clock.advance(0.49)
    assert breaker.failed("a") is False
    assert breaker.allows("a")
    assert breaker.isolated == []
    clock.advance(0.01)  # 1.0 s since the first failure
    assert breaker.failed("a") is True
    assert not breaker.allows("a")
    assert breaker.allows("b")
    assert breaker.isolated == ["a"]


def test_breaker_allows_again_after_the_backoff_then_isolates_at_once_for_longer(fixed_jitter):
    clock = FakeClock()
    breaker = TopicBreaker(1.0, Backoff(2.0, 60.0), clock=clock)
    breaker.failed("a")
    clock.advance(1.0)
    assert breaker.failed("a")  # isolated for 2.0 * 0.75 = 1.5 s
    clock.advance(1.49)
    assert not breaker.allows("a")
    clock.advance(0.01)
    assert breaker.allows("a")
    assert breaker.isolated == []
    # Re-admitted: one more failure isolates it again at once, for twice as long.
    assert breaker.failed("a") is True
    assert not breaker.allows("a")
    clock.advance(2.99)
    assert not breaker.allows("a")
    clock.advance(0.01)
    assert breaker.allows("a")
    assert breaker.failed("a") is True  # third trip: 6.0 s
    clock.advance(5.99)
    assert not breaker.allows("a")
    clock.advance(0.01)
    assert breaker.allows("a")


def test_breaker_second_isolation_is_longer_on_average(monkeypatch):
    values = iter([1.0, 0.5])  # worst case: a full first delay, the least jittered second one
    monkeypatch.setattr(_retry.random, "uniform", lambda a, b: next(values))
    clock = FakeClock()
    breaker = TopicBreaker(0.0, Backoff(2.0, 60.0), clock=clock)
    assert breaker.failed("a")
    first_start = clock.now
    while not breaker.allows("a"):
        clock.advance(0.25)
    first = clock.now - first_start
    assert breaker.failed("a")
    second_start = clock.now
    while not breaker.allows("a"):
        clock.advance(0.25)
    second = clock.now - second_start
    assert first == pytest.approx(2.0)
    assert second == pytest.approx(2.0)  # 4.0 * 0.5: never shorter than the first
    assert second >= first


def test_breaker_success_closes_it_and_restarts_the_failure_window(fixed_jitter):
    clock = FakeClock()
    breaker = TopicBreaker(1.0, Backoff(2.0, 60.0), clock=clock)
    breaker.failed("a")
    clock.advance(1.0)
    assert breaker.failed("a")
    breaker.succeeded("a")
    assert breaker.allows("a")
    assert breaker.isolated == []
    # A fresh failure is not isolated at once: the isolate_after window starts again.
    assert breaker.failed("a") is False
    clock.advance(0.99)
    assert breaker.failed("a") is False
    clock.advance(0.01)
    assert breaker.failed("a") is True
    clock.advance(1.5)  # first trip again (1.5 s), not a second one (3.0 s)
    assert breaker.allows("a")


def test_breaker_isolated_lists_the_topics_sorted(fixed_jitter):
    clock = FakeClock()
    breaker = TopicBreaker(0.0, Backoff(2.0, 60.0), clock=clock)
    assert breaker.failed("zeta")
    assert breaker.failed("alpha")
    assert breaker.isolated == ["alpha", "zeta"]
    breaker.succeeded("zeta")
    assert breaker.isolated == ["alpha"]
    clock.advance(1.5)
    assert breaker.isolated == []


def test_breaker_topic_none_is_its_own_topic(fixed_jitter):
    clock = FakeClock()
    breaker = TopicBreaker(0.0, Backoff(2.0, 60.0), clock=clock)
    assert breaker.failed(None)
    assert not breaker.allows(None)
    assert breaker.allows("a")
    breaker.succeeded(None)
    assert breaker.allows(None)


# == StreamSweepDedup ========================================================================


def ts(seconds: int, inc: int = 0) -> Timestamp:
    return Timestamp(seconds, inc)


def test_dedup_covered_skips_up_to_t_then_stops_after_the_first_later_change():
    dedup = StreamSweepDedup()
    dedup.covered(ts(100, 5))
    assert dedup.skip("a", ts(99, 9))
    assert dedup.skip("b", ts(100, 4))
    assert dedup.skip("c", ts(100, 5))  # at T: covered too
    assert not dedup.skip("d", ts(100, 6))
    # The stream has passed T: nothing is skipped any more, even an earlier time.
    assert not dedup.skip("e", ts(50))
    assert dedup.skipped == 3


def test_dedup_swept_ids_are_skipped_until_a_change_past_the_sweep():
    dedup = StreamSweepDedup()
    dedup.swept({"a", "b"}, ts(200), done=10.0)
    assert dedup.skip("a", ts(150))
    assert not dedup.skip("c", ts(150))  # not swept
    assert dedup.skip("b", ts(200))
    assert not dedup.skip("x", ts(201))  # the stream passed the sweep's read time
    assert not dedup.skip("a", ts(150))  # so swept ids are forgotten
    assert dedup.skipped == 2


def test_dedup_swept_id_with_a_change_past_the_sweep_is_not_skipped():
    dedup = StreamSweepDedup()
    dedup.swept({"a"}, ts(200), done=10.0)
    assert not dedup.skip("a", ts(201))
    assert dedup.skipped == 0


def test_dedup_idle_after_the_sweep_clears_the_swept_ids():
    dedup = StreamSweepDedup()
    dedup.swept({"a", "b"}, ts(200), done=10.0)
    dedup.idle(9.0)  # idle before the sweep ended: it may still lag behind it
    assert dedup.skip("a", ts(150))
    dedup.idle(10.0)  # not after it either
    assert dedup.skip("a", ts(150))
    dedup.idle(10.5)
    assert not dedup.skip("b", ts(150))
    assert dedup.skipped == 2


def test_dedup_ids_of_two_sweeps_accumulate():
    dedup = StreamSweepDedup()
    dedup.swept({"a"}, ts(100), done=1.0)
    dedup.swept({"b"}, ts(200), done=2.0)
    assert dedup.skip("a", ts(90))
    assert dedup.skip("b", ts(190))
    assert not dedup.skip("c", ts(190))
    assert dedup.skipped == 2


def test_dedup_covered_forgets_swept_ids():
    dedup = StreamSweepDedup()
    dedup.swept({"a"}, ts(300), done=1.0)
    dedup.covered(ts(100))
    assert dedup.skip("z", ts(90))
    assert not dedup.skip("a", ts(150))


@pytest.mark.parametrize("odd", [None, 12345, "not-a-timestamp", dt.datetime(2026, 1, 1)])
def test_dedup_handles_non_timestamp_cluster_times(odd):
    dedup = StreamSweepDedup()
    dedup.covered(ts(100))
    assert not dedup.skip("a", odd)  # unknown time: not skipped, no error
    assert dedup.skip("b", ts(50))  # and the covered rule still stands
    dedup.swept({"s"}, ts(200), done=1.0)
    assert dedup.skip("s", odd)  # a swept id is still skipped
    assert not dedup.skip("t", odd)
    assert dedup.skip("s", ts(150))  # an odd time did not clear the swept ids
    assert dedup.skipped == 3


def test_dedup_nothing_skipped_by_default():
    dedup = StreamSweepDedup()
    assert not dedup.skip("a", ts(1))
    assert not dedup.skip("a", None)
    assert dedup.skipped == 0


# == decoding ================================================================================


def test_decode_invalid_utf8_becomes_poison_with_the_id():
    oid = ObjectId()
    raw = invalid_utf8({"_id": oid, "type": "t", "note": "PLACEHOLDER", "attempts": 2})
    record = decode_document(raw)
    assert isinstance(record, Poison)
    assert record.event_id == oid
    assert record.attempts == 2
    assert "decod" in record.reason
    assert record.size == len(raw.raw)


def test_decode_invalid_utf8_keeps_a_string_id():
    raw = invalid_utf8({"_id": "order-17", "type": "PLACEHOLDER"})
    record = decode_document(raw)
    assert isinstance(record, Poison)
    assert record.event_id == "order-17"
    assert "decod" in record.reason


def test_decode_valid_raw_document_is_a_dict_with_aware_datetimes():
    doc = build_document("order.created", {"n": 1}, topic="orders", key="k")
    data = bson.encode(doc)
    decoded = decode_document(RawBSONDocument(data))
    assert isinstance(decoded, dict)
    assert decoded["_id"] == doc["_id"]
    assert decoded["created_at"].tzinfo is not None
    assert decoded["created_at"] == doc["created_at"]
    event = to_event(decoded, None, len(data))
    assert isinstance(event, Event)
    assert event.message.topic == "orders"
    assert event.message.ordering_key == "k"
    assert event.size == len(data)


def test_decode_passes_a_decoded_mapping_through():
    doc = {"_id": ObjectId(), "x": 1}
    assert decode_document(doc) == doc


def test_decode_date_out_of_python_range_does_not_raise():
    oid = ObjectId()
    raw = RawBSONDocument(bson.encode({"_id": oid, "created_at": DatetimeMS(2**62)}))
    decoded = decode_document(raw)
    assert not isinstance(decoded, Poison)
    assert decoded["_id"] == oid
    # and the relay then sets it aside as poison rather than failing
    record = to_event({**_good_doc(), "created_at": decoded["created_at"]}, "dflt")
    assert isinstance(record, Poison)
    assert "created_at" in record.reason


def _good_doc(**fields: Any) -> dict[str, Any]:
    doc = {
        "_id": ObjectId(),
        "type": "order.created",
        "topic": None,
        "key": None,
        "payload": b'{"n":1}',
        "attributes": {},
        "created_at": utcnow(),
        "status": "pending",
        "attempts": 0,
    }
    doc.update(fields)
    return doc


def test_to_event_applies_the_default_topic():
    doc = _good_doc(attempts=3)
    event = to_event(doc, "fallback")
    assert isinstance(event, Event)
    assert event.message.topic == "fallback"
    assert event.message.event_id == doc["_id"]
    assert event.attempts == 3
    assert event.size == event.message.size > 0


def test_to_event_keeps_its_own_topic_over_the_default():
    event = to_event(_good_doc(topic="orders"), "fallback")
    assert isinstance(event, Event)
    assert event.message.topic == "orders"


def test_to_event_without_any_topic_is_poison_naming_the_flag():
    doc = _good_doc(attempts=1)
    record = to_event(doc, None, 77)
    assert isinstance(record, Poison)
    assert record.event_id == doc["_id"]
    assert "--default-topic" in record.reason
    assert record.attempts == 1
    assert record.size == 77


def test_to_event_with_a_string_id_is_poison():
    record = to_event(_good_doc(_id="order-17"), "dflt")
    assert isinstance(record, Poison)
    assert record.event_id == "order-17"
    assert "_id" in record.reason


def test_to_event_with_an_oversized_payload_is_poison():
    doc = _good_doc(topic="orders", payload=b"x" * 11_000_000)
    record = to_event(doc, None)
    assert isinstance(record, Poison)
    assert record.event_id == doc["_id"]
    assert "10,000,000" in record.reason


def test_to_event_passes_poison_through():
    poison = Poison("x", 0, "bad", 3)
    assert to_event(poison, "dflt") is poison


# == Checkpoint ==============================================================================


class FakeStore:
    """load_token/save_token of an OutboxStore, in memory."""

    def __init__(self, token: Any = None, *, accept: bool = True) -> None:
        self.state: dict[str, Any] = {} if token is None else {"resume_token": token}
        self.accept = accept
        self.loads = 0
        self.saves: list[tuple[str, Any, Any]] = []

    def load_token(self, name: str) -> Any:
        self.loads += 1
        token = self.state.get("resume_token")
        return token if isinstance(token, Mapping) else None

    def save_token(self, name: str, token: Any, at: dt.datetime, fence: Any = None) -> bool:
        assert at.tzinfo is not None
        self.saves.append((name, token, fence))
        if self.accept:
            self.state["resume_token"] = token
        return self.accept


class FakeLease:
    def __init__(self, remaining: float = 5.0) -> None:
        self.lost = False
        self.checks = 0
        self._remaining = remaining

    def check(self) -> None:
        self.checks += 1
        if self.lost:
            raise LeaseLostError("lease lost (fake)")

    def confirm(self) -> None:
        self.check()

    def fenced(self) -> dict[str, Any]:
        return {"_id": "default", "fence": 7}

    def remaining(self) -> float:
        return self._remaining


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock(100.0)
    monkeypatch.setattr(_checkpoint, "time", types.SimpleNamespace(monotonic=fake, time=fake))
    return fake


A = {"_data": "A"}
B = {"_data": "B"}
C = {"_data": "C"}
D = {"_data": "D"}


def test_checkpoint_loads_once_until_invalidated(clock):
    store = FakeStore(A)
    cp = Checkpoint(store, "default", FakeLease(), interval=10.0)
    assert cp.load() == A
    store.state["resume_token"] = B  # another relay moved it
    assert cp.load() == A
    assert store.loads == 1
    cp.invalidate()
    assert cp.load() == B
    assert cp.token == B
    assert store.loads == 2


def test_checkpoint_without_a_saved_token_loads_none(clock):
    store = FakeStore()
    cp = Checkpoint(store, "default", FakeLease(), interval=10.0)
    assert cp.load() is None
    cp.save(force=True)
    assert store.saves == []  # nothing to save yet


@pytest.mark.parametrize("odd", ["a-string", ["_data", "A"], 42, b"raw"])
def test_checkpoint_non_mapping_token_is_none(clock, odd):
    store = FakeStore(odd)
    cp = Checkpoint(store, "default", FakeLease(), interval=10.0)
    assert cp.load() is None
    assert cp.token is None
    cp.save(force=True)
    assert store.saves == []


def test_checkpoint_saves_only_moved_tokens_at_most_every_interval(clock):
    store = FakeStore(A)
    lease = FakeLease()
    cp = Checkpoint(store, "relay-1", lease, interval=10.0)
    cp.load()
    cp.save(force=True)
    assert store.saves == []  # not moved
    cp.advance(None)
    assert cp.token == A
    cp.advance(B)
    cp.save()
    assert store.saves == [("relay-1", B, lease.fenced())]
    assert cp.saved_at == 100.0
    cp.advance(C)
    clock.advance(9.99)
    cp.save()
    assert len(store.saves) == 1  # the interval has not elapsed
    clock.advance(0.01)
    cp.save()
    assert store.saves[-1][1] == C
    assert cp.saved_at == 110.0
    cp.save()
    assert len(store.saves) == 2
    cp.advance(D)
    clock.advance(1.0)
    cp.save(force=True)  # forced: no interval
    assert store.saves[-1][1] == D
    assert len(store.saves) == 3
    assert lease.checks == 3  # checked before each write


def test_checkpoint_refused_save_raises_lease_lost_and_stays_unsaved(clock):
    store = FakeStore(A, accept=False)
    cp = Checkpoint(store, "default", FakeLease(), interval=10.0)
    cp.load()
    cp.advance(B)
    with pytest.raises(LeaseLostError, match="checkpoint refused"):
        cp.save(force=True)
    assert store.state["resume_token"] == A
    store.accept = True
    cp.save(force=True)  # B was never saved: it is tried again
    assert store.state["resume_token"] == B
    assert len(store.saves) == 2


def test_checkpoint_lost_lease_stops_the_save_before_writing(clock):
    store = FakeStore(A)
    lease = FakeLease()
    lease.lost = True
    cp = Checkpoint(store, "default", lease, interval=10.0)
    cp.load()
    cp.advance(B)
    with pytest.raises(LeaseLostError):
        cp.save(force=True)
    assert store.saves == []


def test_checkpoint_forget_drops_the_token(clock):
    store = FakeStore(A)
    cp = Checkpoint(store, "default", FakeLease(), interval=10.0)
    cp.load()
    cp.advance(B)
    cp.forget()
    assert cp.token is None
    cp.save(force=True)
    assert store.saves == []
    assert cp.load() is None  # not read back until invalidated: the next start recovers
    cp.advance(C)
    cp.save(force=True)
    assert store.saves[-1][1] == C


# == Dispatcher ==============================================================================


class RecordingStore:
    """The Marker's side of an OutboxStore: records each write."""

    def __init__(self) -> None:
        self.published: list[list[Any]] = []
        self.failures: list[Failure] = []
        self._lock = threading.Lock()

    def mark_published(self, ids: list[Any], at: dt.datetime) -> None:
        with self._lock:
            if ids:
                self.published.append(list(ids))

    def record_failures(self, failures: Any) -> None:
        with self._lock:
            self.failures.extend(failures)


class RecordingPublisher:
    """Wraps an InMemoryPublisher, remembering each call's timeout and messages."""

    def __init__(self, inner: InMemoryPublisher | None = None) -> None:
        self.inner = inner or InMemoryPublisher()
        self.timeouts: list[float | None] = []
        self.batches: list[list[Any]] = []

    def publish(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        self.batches.append([m.event_id for m in messages])
        return self.inner.publish(messages, timeout=timeout)

    def close(self) -> None:
        self.inner.close()


CONFIG = RelayConfig(database="d", transient_initial=0.001, transient_max=0.01, isolate_after=0.05)


@dataclass
class Kit:
    dispatcher: Dispatcher
    publisher: InMemoryPublisher
    store: RecordingStore
    lease: FakeLease
    stats: RelayStats
    stop: threading.Event


@pytest.fixture
def kit():
    made: list[Dispatcher] = []

    def make(publisher: Any = None, config: RelayConfig = CONFIG, remaining: float = 5.0) -> Kit:
        publisher = publisher if publisher is not None else InMemoryPublisher()
        store, lease, stats = RecordingStore(), FakeLease(remaining), RelayStats()
        dispatcher = Dispatcher(FencedPublisher(publisher, lease), store, config, stats)
        stop = threading.Event()
        dispatcher.start(stop)
        made.append(dispatcher)
        inner = publisher.inner if isinstance(publisher, RecordingPublisher) else publisher
        return Kit(dispatcher, inner, store, lease, stats, stop)

    yield make
    for dispatcher in made:
        dispatcher.close()


def ev(topic: str, key: str | None = None, attempts: int = 0) -> Event:
    return Event(Message(ObjectId(), topic, b"x", key, {}), attempts, 1)


def _ids(events):
    return [e.message.event_id for e in events]


def _sent(publisher: InMemoryPublisher) -> list[Any]:
    return [m.event_id for m in publisher.messages]


def test_dispatch_publishes_in_order_and_marks(kit):
    k = kit()
    events = [ev("a", "k"), ev("b"), ev("a", "k"), ev("a")]
    handled = k.dispatcher.dispatch(events)
    assert handled == set(_ids(events))
    assert _sent(k.publisher) == _ids(events)
    k.dispatcher.flush()
    assert k.store.published == [_ids(events)]
    assert k.store.failures == []
    assert k.stats.published == 4


def test_dispatch_poison_is_recorded_dead_and_not_published(kit):
    k = kit()
    good = ev("b")
    handled = k.dispatcher.dispatch(
        [Poison("bad-id", 2, "cannot decode the document", 10), good, Poison(None, 0, "x", 1)]
    )
    # A document whose _id cannot be decoded cannot be marked: it is neither handled nor
    # counted dead (it is logged; a sweep finds it again).
    assert handled == {"bad-id", good.message.event_id}
    assert _sent(k.publisher) == [good.message.event_id]
    k.dispatcher.flush()
    assert k.store.failures == [Failure("bad-id", 3, "cannot decode the document", None)]
    assert k.store.published == [[good.message.event_id]]
    assert k.stats.dead == 1
    assert k.stats.published == 1


def test_dispatch_poison_holds_its_slot_under_the_hold_policy(kit):
    for policy, held in (("hold", True), ("release", False)):
        k = kit(config=dataclasses.replace(CONFIG, dead_key_policy=policy))
        later = ev("a", "k")
        poison = Poison("p", 0, "poison: bad", 1, message_lane(later.message))
        k.dispatcher.dispatch([poison, later])
        assert (_sent(k.publisher) == []) is held, policy
        assert (not k.dispatcher.gate.admits(message_lane(later.message))) is held


def test_dispatch_skips_events_of_a_held_slot(kit):
    k = kit()
    held1, free, keyless, held2 = ev("a", "k"), ev("a", "j"), ev("a"), ev("a", "k")
    other_topic = ev("b", "k")  # same key, other topic: another slot
    k.dispatcher.gate.hold([message_lane(held1.message)])
    handled = k.dispatcher.dispatch([held1, free, keyless, held2, other_topic])
    assert _sent(k.publisher) == _ids([free, keyless, other_topic])
    assert handled == set(_ids([free, keyless, other_topic]))
    k.dispatcher.flush()
    assert k.store.failures == []


def test_dispatch_passes_the_lease_remaining_as_publish_timeout(kit):
    publisher = RecordingPublisher()
    k = kit(publisher, remaining=4.25)
    k.dispatcher.dispatch([ev("a"), ev("b")])
    assert publisher.timeouts == [4.25]
    assert len(k.publisher.messages) == 2


def test_dispatch_checks_the_lease_before_publishing(kit):
    k = kit()
    k.lease.lost = True
    with pytest.raises(LeaseLostError):
        k.dispatcher.dispatch([ev("a")])
    assert k.publisher.calls == 0


class FlakyPublisher(InMemoryPublisher):
    """Fails the first ``n`` calls transiently, then behaves."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def publish(self, messages, *, timeout=None):
        if self.n > 0:
            self.n -= 1
            self.calls += 1
            return [TransientPublishError("flaky") for _ in messages]
        return super().publish(messages, timeout=timeout)


def test_dispatch_retries_transient_failures_in_place(kit):
    k = kit(FlakyPublisher(2))
    events = [ev("a", "k"), ev("a", "k"), ev("a")]
    handled = k.dispatcher.dispatch(events)
    assert handled == set(_ids(events))
    assert _sent(k.publisher) == _ids(events)
    assert k.publisher.calls == 3
    k.dispatcher.flush()
    assert k.store.failures == []  # transient errors count no attempt
    assert k.stats.failed == 0


def test_dispatch_isolates_a_failing_topic_while_others_are_published(kit):
    k = kit()
    shift = [0.0]
    # The dispatcher's own breaker, on a clock the test can move (isolated 30-60 s, far longer
    # than the test takes on a loaded machine).
    k.dispatcher.breaker = TopicBreaker(
        CONFIG.isolate_after, Backoff(60.0, 60.0), clock=lambda: time.monotonic() + shift[0]
    )
    k.publisher.fail_topic("a", transient=True)
    a1, b1, a2, b2, a3 = ev("a", "k"), ev("b", "k"), ev("a"), ev("b"), ev("a", "k")
    started = time.monotonic()
    handled = k.dispatcher.dispatch([a1, b1, a2, b2, a3])
    elapsed = time.monotonic() - started
    assert handled == set(_ids([b1, b2]))
    assert _sent(k.publisher) == _ids([b1, b2])
    assert elapsed >= CONFIG.isolate_after  # retried in place until isolated
    assert k.publisher.calls >= 2
    assert k.dispatcher.gate.held == {message_lane(a1.message)}  # "b"'s slot flows
    assert not k.dispatcher.breaker.allows("a")
    assert k.dispatcher.breaker.allows("b")
    assert k.dispatcher.breaker.isolated == ["a"]
    k.dispatcher.flush()
    assert k.store.published == [_ids([b1, b2])]
    assert k.store.failures == []
    assert k.stats.failed == 0

    # While isolated, later events of "a" are not even tried; their slots are held.
    calls = k.publisher.calls
    a4, a5 = ev("a"), ev("a", "other")
    assert k.dispatcher.dispatch([a4, a5]) == set()
    assert k.publisher.calls == calls
    assert message_lane(a5.message) in k.dispatcher.gate.held

    # Healed and past the isolation: "a" goes again; the breaker closes.
    k.publisher.heal_topic("a")
    shift[0] = 61.0
    assert k.dispatcher.breaker.allows("a")
    assert k.dispatcher.dispatch([a4]) == {a4.message.event_id}
    assert k.dispatcher.breaker.isolated == []
    # Held slots wait for the sweep to rebuild the gate.
    assert k.dispatcher.dispatch([a1, a3]) == set()
    k.dispatcher.release_holds()
    assert k.dispatcher.dispatch([a1, a3]) == set(_ids([a1, a3]))
    assert _sent(k.publisher) == _ids([b1, b2, a4, a1, a3])


def test_dispatch_with_the_configured_breaker_returns_once_the_topic_is_isolated(kit):
    k = kit()
    k.publisher.fail_topic("a", transient=True)
    a1, b1 = ev("a", "k"), ev("b", "k")
    started = time.monotonic()
    handled = k.dispatcher.dispatch([a1, b1])
    assert time.monotonic() - started >= CONFIG.isolate_after
    assert handled == {b1.message.event_id}
    assert k.dispatcher.gate.held == {message_lane(a1.message)}
    assert _sent(k.publisher) == [b1.message.event_id]


def test_dispatch_stop_ends_transient_retries(kit):
    k = kit(config=RelayConfig(database="d", transient_initial=10.0, isolate_after=3600.0))
    k.publisher.fail_topic("a", transient=True)
    k.stop.set()
    started = time.monotonic()
    assert k.dispatcher.dispatch([ev("a", "k")]) == set()
    assert time.monotonic() - started < 5.0
    assert k.publisher.calls == 1


def test_dispatch_permanent_failure_blocks_the_slot_and_records_an_attempt(kit):
    k = kit()
    k.publisher.fail_topic("a")  # permanent
    a1, a2, a3, b1 = ev("a", "k", attempts=2), ev("a", "k"), ev("a"), ev("b", "k")
    before = utcnow()
    handled = k.dispatcher.dispatch([a1, a2, a3, b1])
    assert handled == {b1.message.event_id}
    assert k.publisher.calls == 1  # no in-place retry of a permanent error
    assert k.dispatcher.gate.held == {message_lane(a1.message)}
    k.dispatcher.flush()
    by_id = {f.event_id: f for f in k.store.failures}
    assert set(by_id) == {a1.message.event_id, a3.message.event_id}  # a2 waits behind a1
    assert by_id[a1.message.event_id].attempts == 3
    assert by_id[a3.message.event_id].attempts == 1
    for failure in by_id.values():
        assert failure.next_attempt_at is not None
        assert failure.next_attempt_at >= before
        assert "refused" in failure.error
    assert k.store.published == [[b1.message.event_id]]
    assert k.stats.failed == 2
    assert k.stats.dead == 0
    # The next dispatch of the held slot is skipped.
    assert k.dispatcher.dispatch([a2]) == set()
    assert k.publisher.calls == 1


def test_dispatch_last_attempt_makes_the_event_dead(kit):
    k = kit()
    k.publisher.fail_topic("a")
    last = ev("a", "k", attempts=CONFIG.max_attempts - 1)
    assert k.dispatcher.dispatch([last]) == {last.message.event_id}
    k.dispatcher.flush()
    [failure] = k.store.failures
    assert failure.next_attempt_at is None
    assert failure.attempts == CONFIG.max_attempts
    assert k.stats.dead == 1
    assert k.dispatcher.gate.held == frozenset()  # dead_key_policy "release"


# == PubSubPublisher =========================================================================


@dataclass
class Call:
    topic: str
    ids: list[str]
    keys: list[str]
    timeout: Any
    retry: Any


class FakeGapic:
    """A GAPIC PublisherClient: records requests; ``refuse(topic, ids)`` may return an error."""

    def __init__(self, refuse=None) -> None:
        self.calls: list[Call] = []
        self.sent: list[tuple[str, str]] = []  # (ordering key, event id) accepted
        self._refuse = refuse or (lambda topic, ids: None)

    def publish(self, *, request, retry=None, timeout=None):
        ids = [m.attributes["outbox_event_id"] for m in request.messages]
        keys = [m.ordering_key for m in request.messages]
        self.calls.append(Call(request.topic, ids, keys, timeout, retry))
        error = self._refuse(request.topic, ids)
        if error is not None:
            raise error
        self.sent.extend(zip(keys, ids, strict=True))
        return types.SimpleNamespace(message_ids=[str(i) for i in range(len(ids))])


def msg(topic: str, key: str | None = None) -> Message:
    oid = ObjectId()
    return Message(oid, topic, f"data-{oid}".encode(), key, {"outbox_event_id": str(oid)})


def _eid(m: Message) -> str:
    return str(m.event_id)


def _refuse_containing(bad: Message):
    def refuse(topic, ids):
        if _eid(bad) in ids:
            return gexc.InvalidArgument("invalid message in request")
        return None

    return refuse


def test_pubsub_bad_message_is_isolated_by_splitting_and_the_others_go_once():
    messages = [msg("orders", k) for k in ("k", "j", None, "k", "j", None, "k", "j", None)]
    bad = messages[4]
    client = FakeGapic(_refuse_containing(bad))
    publisher = PubSubPublisher("proj", client=client)
    results = publisher.publish(messages)
    assert isinstance(results[4], PermanentPublishError)
    assert isinstance(results[4].__cause__, gexc.InvalidArgument)
    # Only key "j" after the bad one is held back; everything else is published.
    assert results[7] is not None
    assert [r for i, r in enumerate(results) if i not in (4, 7)] == [None] * 7
    sent_ids = [i for _, i in client.sent]
    assert Counter(sent_ids) == Counter(_eid(m) for i, m in enumerate(messages) if i not in (4, 7))
    for key in ("k", "j", ""):
        expected = [_eid(m) for m in messages if (m.ordering_key or "") == key]
        got = [i for k, i in client.sent if k == key]
        assert got == [e for e in expected if e in got]  # per-key order kept
    assert all(c.topic == "projects/proj/topics/orders" for c in client.calls)
    assert all(c.retry is None for c in client.calls)


def test_pubsub_bad_keyless_message_costs_nobody_else():
    messages = [msg("orders", k) for k in ("k", "j", None, "k", None, "j")]
    bad = messages[2]
    client = FakeGapic(_refuse_containing(bad))
    results = PubSubPublisher("proj", client=client).publish(messages)
    assert isinstance(results[2], PermanentPublishError)
    assert [r for i, r in enumerate(results) if i != 2] == [None] * 5
    assert [i for _, i in client.sent] == [_eid(m) for i, m in enumerate(messages) if i != 2]


def test_pubsub_later_messages_of_a_bad_key_are_not_sent_after_it():
    messages = [
        msg("orders", "k"),  # 0 published
        msg("orders", "j"),  # 1 published
        msg("orders", "k"),  # 2 bad
        msg("orders", "j"),  # 3 published
        msg("orders", "k"),  # 4 held
        msg("orders"),  # 5 published
        msg("orders", "k"),  # 6 held
        msg("audit", "k"),  # 7 other topic, same key: published
    ]
    client = FakeGapic(_refuse_containing(messages[2]))
    results = PubSubPublisher("proj", client=client).publish(messages)
    assert isinstance(results[2], PermanentPublishError)
    for i in (4, 6):
        assert isinstance(results[i], PublishError)
        assert _eid(messages[i]) not in [e for _, e in client.sent]
    for i in (0, 1, 3, 5, 7):
        assert results[i] is None
    sent = [e for _, e in client.sent]
    assert Counter(sent) == Counter(_eid(messages[i]) for i in (0, 1, 3, 5, 7))
    # nothing of key "k" on "orders" after the bad message
    sent_k = [e for k, e in client.sent if k == "k" and e != _eid(messages[7])]
    assert sent_k == [_eid(messages[0])]


def test_pubsub_not_found_is_not_split():
    orders = [msg("orders", k) for k in ("k", None, "j", "k")]
    audit = [msg("audit"), msg("audit", "k")]
    messages = [orders[0], audit[0], orders[1], orders[2], audit[1], orders[3]]

    def refuse(topic, ids):
        return gexc.NotFound("no topic") if topic.endswith("/orders") else None

    client = FakeGapic(refuse)
    results = PubSubPublisher("proj", client=client).publish(messages)
    assert len([c for c in client.calls if c.topic.endswith("/orders")]) == 1
    for m, r in zip(messages, results, strict=True):
        if m.topic == "orders":
            assert isinstance(r, PermanentPublishError)
            assert "does not exist" in str(r)
        else:
            assert r is None
    assert [e for _, e in client.sent] == [_eid(audit[0]), _eid(audit[1])]


def test_pubsub_transient_refusal_is_not_split_and_is_transient():
    client = FakeGapic(lambda topic, ids: gexc.ServiceUnavailable("down"))
    messages = [msg("orders", "k"), msg("orders"), msg("orders", "k")]
    results = PubSubPublisher("proj", client=client).publish(messages)
    assert len(client.calls) == 1
    assert all(isinstance(r, TransientPublishError) for r in results)


def test_pubsub_no_time_left_sends_nothing():
    client = FakeGapic()
    messages = [msg("orders", "k"), msg("orders"), msg("audit")]
    results = PubSubPublisher("proj", client=client).publish(messages, timeout=0.0)
    assert client.calls == []
    assert len(results) == 3
    for r in results:
        assert isinstance(r, TransientPublishError)
        assert "lease" in str(r)


def test_pubsub_request_timeout_is_bounded_by_the_call_timeout():
    client = FakeGapic()
    PubSubPublisher("proj", client=client).publish([msg("orders")], timeout=3.0)
    [call] = client.calls
    assert 0 < call.timeout <= 3.0
    assert call.retry is None


def test_pubsub_request_timeout_defaults_to_the_constructor_timeout():
    client = FakeGapic()
    publisher = PubSubPublisher("proj", client=client, timeout=2.0)
    publisher.publish([msg("orders")])
    publisher.publish([msg("orders")], timeout=60.0)
    assert [c.timeout for c in client.calls] == [2.0, 2.0]


def test_pubsub_message_without_topic_fails_permanently_alone():
    client = FakeGapic()
    messages = [Message(ObjectId(), None, b"x", None, {"outbox_event_id": "0"}), msg("orders")]
    results = PubSubPublisher("proj", client=client).publish(messages)
    assert isinstance(results[0], PermanentPublishError)
    assert results[1] is None
    assert [e for _, e in client.sent] == [_eid(messages[1])]


class _ScriptedPublisher:
    """Answers each publish call from a script of per-topic errors, then succeeds."""

    def __init__(self, *rounds: dict[str, Any]) -> None:
        self.rounds = list(rounds)

    def publish(self, messages, *, timeout=None):
        errors = self.rounds.pop(0) if self.rounds else {}
        return [errors.get(m.topic) for m in messages]

    def close(self) -> None:
        pass


def test_dispatch_does_not_count_unsent_messages_against_their_topic(kit):
    from mongo_outbox._errors import NotSentError

    # An isolation of 30-60 s (it starts at transient_max): the check below cannot outlast it,
    # however slow the machine (at CONFIG's 10 ms it did under a full suite run).
    config = dataclasses.replace(CONFIG, isolate_after=0.0, transient_max=60.0)
    script = {"a": TransientPublishError("a is down"), "b": NotSentError("no time left")}
    k = kit(publisher=_ScriptedPublisher(script), config=config)
    a, b = ev("a", "k"), ev("b", "k")
    handled = k.dispatcher.dispatch([a, b])
    assert not k.dispatcher.breaker.allows("a")  # really failed: isolated at once
    assert k.dispatcher.breaker.allows("b")  # only not sent: retried, and then published
    assert handled == {b.message.event_id}


def test_poison_under_hold_holds_its_key_for_the_rest_of_its_batch(kit):
    k = kit(config=dataclasses.replace(CONFIG, dead_key_policy="hold"))
    before = ev("t", "other")
    poison = Poison(ObjectId(), 0, "bad", 10, slot=message_lane(ev("t", "k").message))
    after = ev("t", "k")
    k.dispatcher.dispatch([before, poison, after])
    k.dispatcher.flush()
    assert _sent(k.publisher) == [before.message.event_id]
    assert len(k.dispatcher.gate) == 1


def test_decode_batch_decodes_all_at_once_or_names_the_poison():
    good = [RawBSONDocument(bson.encode(build_document("T", b"x", key=f"k{i}"))) for i in range(3)]
    docs = decode_batch(good)
    assert [d["key"] for d in docs] == ["k0", "k1", "k2"]
    bad = invalid_utf8(build_document("T", b"x", key="PLACEHOLDER"))
    mixed = decode_batch([good[0], bad, good[1]])
    assert isinstance(mixed[0], dict)
    assert isinstance(mixed[2], dict)
    assert isinstance(mixed[1], Poison)
    assert "cannot decode" in mixed[1].reason
