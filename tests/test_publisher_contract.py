"""One contract, two publishers: the in-memory one and Pub/Sub on the emulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from bson import ObjectId

from mongo_outbox import InMemoryPublisher, Message, PermanentPublishError, PubSubPublisher
from mongo_outbox.publishers import Publisher


def _message(topic: str | None, key: str | None, n: int) -> Message:
    return Message(ObjectId(), topic, f"m{n}".encode(), key, {"n": str(n)})


class _Harness:
    """A publisher plus a way to see what a topic received and to break a topic."""

    def __init__(self, publisher: Publisher, received: Any, good: str, missing: str) -> None:
        self.publisher = publisher
        self.received = received
        self.good = good
        self.missing = missing


@pytest.fixture(params=["memory", "pubsub"])
def harness(request) -> Iterator[_Harness]:
    if request.param == "memory":
        memory = InMemoryPublisher()
        memory.fail_topic("missing")

        def received_memory(topic: str, count: int) -> list[bytes]:
            return [m.data for m in memory.messages if m.topic == topic]

        yield _Harness(memory, received_memory, "good", "missing")
        return
    kit = request.getfixturevalue("pubsub")
    topic, sub = kit.topic()
    publisher = PubSubPublisher(kit.project)

    def received_pubsub(topic_: str, count: int) -> list[bytes]:
        return [m.data for m in sub.pull_until(count)]

    yield _Harness(publisher, received_pubsub, topic, "missing-topic")
    publisher.close()


def test_publishes_in_order_and_confirms_each(harness):
    messages = [_message(harness.good, f"k{n % 2}", n) for n in range(10)]
    assert harness.publisher.publish(messages) == [None] * 10
    got = harness.received(harness.good, 10)
    assert [d for d in got if int(d[1:]) % 2 == 0] == [f"m{n}".encode() for n in range(0, 10, 2)]
    assert [d for d in got if int(d[1:]) % 2 == 1] == [f"m{n}".encode() for n in range(1, 10, 2)]


def test_failed_topic_reports_permanent_error_and_spares_others(harness):
    messages = [
        _message(harness.missing, "k", 0),
        _message(harness.good, "other", 1),
        _message(harness.missing, "k", 2),
    ]
    results = harness.publisher.publish(messages)
    assert isinstance(results[0], PermanentPublishError)
    assert results[1] is None
    assert results[2] is not None, "a later message of a failed key must not be sent"
    assert harness.received(harness.good, 1) == [b"m1"]


def test_empty_batch(harness):
    assert harness.publisher.publish([]) == []
