"""Unit tests of ``InMemoryPublisher``, the publisher that unit tests and the demo use."""

from __future__ import annotations

from bson import ObjectId

from mongo_outbox import (
    InMemoryPublisher,
    Message,
    PermanentPublishError,
    Publisher,
    PublishError,
    TransientPublishError,
)


def _msg(topic: str = "orders", key: str | None = None, data: bytes = b"{}") -> Message:
    return Message(ObjectId(), topic, data, key, {"outbox_event_type": "T"})


def test_satisfies_the_publisher_protocol():
    assert isinstance(InMemoryPublisher(), Publisher)


def test_publishes_in_order_and_reports_success():
    seen: list[Message] = []
    publisher = InMemoryPublisher(on_publish=seen.append)
    batch = [_msg(key="a", data=b"1"), _msg(data=b"2"), _msg("other", key="a", data=b"3")]
    assert publisher.publish(batch) == [None, None, None]
    assert publisher.messages == batch
    assert seen == batch
    assert publisher.publish([]) == []
    assert publisher.messages == batch


def test_failed_topic_permanent():
    seen: list[Message] = []
    publisher = InMemoryPublisher(on_publish=seen.append)
    publisher.fail_topic("orders")
    good = _msg("payments")
    results = publisher.publish([_msg("orders"), good])
    assert isinstance(results[0], PermanentPublishError)
    assert "orders" in str(results[0])
    assert results[1] is None
    assert publisher.messages == [good]
    assert seen == [good]


def test_failed_topic_transient():
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders", transient=True)
    (result,) = publisher.publish([_msg("orders")])
    assert isinstance(result, TransientPublishError)
    assert not isinstance(result, PermanentPublishError)
    assert publisher.messages == []


def test_each_failure_is_a_fresh_error():
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")
    first, second = publisher.publish([_msg("orders"), _msg("orders")])
    assert isinstance(first, PublishError)
    assert isinstance(second, PublishError)
    assert first is not second


def test_later_messages_of_a_failed_key_in_the_batch_are_reported_failed():
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")
    first = _msg("orders", key="k")
    held_same_topic = _msg("orders", key="k")
    # Pub/Sub orders per topic and key: the same key on a healthy topic goes on.
    same_key_other_topic = _msg("payments", key="k")
    other_key = _msg("payments", key="j")
    keyless = _msg("payments")
    results = publisher.publish([first, held_same_topic, same_key_other_topic, other_key, keyless])
    assert isinstance(results[0], PermanentPublishError)
    # The one held behind the failure is reported as transient: it can go once that does.
    assert isinstance(results[1], TransientPublishError)
    assert "'k'" in str(results[1])
    assert results[2:] == [None, None, None]
    assert publisher.messages == [same_key_other_topic, other_key, keyless]


def test_earlier_messages_of_a_key_before_a_failure_are_published():
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")
    before = _msg("orders", key="k")
    publisher.heal_topic("orders")
    assert publisher.publish([before]) == [None]
    publisher.fail_topic("orders")
    results = publisher.publish([_msg("orders", key="k"), _msg("orders", key="k")])
    assert isinstance(results[0], PermanentPublishError)
    assert isinstance(results[1], TransientPublishError)
    assert publisher.messages == [before]


def test_a_failed_key_is_only_stopped_for_that_batch():
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")
    publisher.publish([_msg("orders", key="k")])
    later = _msg("payments", key="k")
    assert publisher.publish([later]) == [None]
    assert publisher.messages == [later]


def test_heal_topic():
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")
    assert isinstance(publisher.publish([_msg("orders")])[0], PermanentPublishError)
    publisher.heal_topic("orders")
    healed = _msg("orders", key="k")
    assert publisher.publish([healed]) == [None]
    assert publisher.messages == [healed]
    publisher.heal_topic("never-failed")  # no error


def test_fail_topic_can_switch_kind():
    publisher = InMemoryPublisher()
    publisher.fail_topic("orders")
    publisher.fail_topic("orders", transient=True)
    assert isinstance(publisher.publish([_msg("orders")])[0], TransientPublishError)


def test_close():
    publisher = InMemoryPublisher()
    assert publisher.closed is False
    publisher.close()
    assert publisher.closed is True
