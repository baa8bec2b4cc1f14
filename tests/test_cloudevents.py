"""The CloudEvents message format: read back with the CloudEvents project's own SDK.

The SDK has no Pub/Sub binding; its HTTP binary-mode reader takes the same names (``ce-*``
attributes, ``content-type``), so a received message's attributes go in as headers.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from bson import ObjectId
from cloudevents.core.bindings.http import HTTPMessage, from_binary_event

from mongo_outbox import ConfigurationError, ValidationError, outbox_transaction
from mongo_outbox._admin import OutboxAdmin
from mongo_outbox._document import build_document
from mongo_outbox._errors import PoisonEventError
from mongo_outbox._formats import OUTBOX, MessageFormat, default_source
from mongo_outbox._limits import MAX_ATTRIBUTES, MAX_MESSAGE_BYTES, RESERVED_OVERHEAD
from mongo_outbox._message import message_from_document
from mongo_outbox.relay import RelayConfig


def _read(message: Any) -> Any:
    return from_binary_event(HTTPMessage(headers=dict(message.attributes), body=message.data))


def _emit_three(client: Any, db: str, topic: str) -> dict[str, Any]:
    with outbox_transaction(client, database=db) as tx:
        ids = {
            "json": tx.emit("OrderCreated", {"id": 7, "note": "héllo"}, topic=topic, key="k"),
            "text": tx.emit("Note", "plain text", topic=topic, key="k", attributes={"a": "b"}),
            "bytes": tx.emit("Blob", b"\x00\xffraw", topic=topic, key="k"),
        }
    return ids


def test_a_cloudevents_sdk_reads_what_the_relay_publishes(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    ids = _emit_three(client, db_name, topic)
    runner = relay_factory(db_name, start=False, message_format="cloudevents")
    assert runner.relay.run_once() == 3
    received = {m.attributes["outbox_event_id"]: m for m in sub.pull_until(3)}
    created = {d["_id"]: d["created_at"] for d in client[db_name].outbox.find()}
    events = {name: _read(received[str(event_id)]) for name, event_id in ids.items()}
    for name, event in events.items():
        event_id = ids[name]
        assert event.get_specversion() == "1.0"
        assert event.get_id() == str(event_id)
        assert event.get_source() == f"mongo-outbox://{db_name}/outbox"
        assert event.get_time() == created[event_id]
        assert event.get_time().tzinfo is not None
    assert [events[n].get_type() for n in ("json", "text", "bytes")] == [
        "OrderCreated",
        "Note",
        "Blob",
    ]
    assert events["json"].get_data() == {"id": 7, "note": "héllo"}
    assert events["json"].get_datacontenttype() == "application/json"
    assert events["text"].get_data() == "plain text"
    assert events["text"].get_datacontenttype() == "text/plain; charset=utf-8"
    assert received[str(ids["bytes"])].data == b"\x00\xffraw"
    assert "content-type" not in received[str(ids["bytes"])].attributes  # unknown media type
    # User attributes stay, and consumers de-duplicate by outbox_event_id as in the outbox format.
    assert received[str(ids["text"])].attributes["a"] == "b"
    assert not any(
        k.startswith("outbox_") and k != "outbox_event_id"
        for k in received[str(ids["text"])].attributes
    )
    assert {m.ordering_key for m in received.values()} == {"k"}


def test_cloudevents_source_is_configurable(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    _emit_three(client, db_name, topic)
    runner = relay_factory(
        db_name, start=False, message_format="cloudevents", cloudevents_source="//shop/orders"
    )
    assert runner.relay.run_once() == 3
    assert {_read(m).get_source() for m in sub.pull_until(3)} == {"//shop/orders"}


def test_the_default_format_is_unchanged_byte_for_byte():
    doc = build_document(
        "OrderCreated",
        {"id": 7},
        topic="orders",
        key="order-7",
        attributes={"tenant": "acme"},
        event_id=ObjectId("65f000000000000000000001"),
        created_at=dt.datetime(2026, 11, 28, 1, 2, 3, 456000, tzinfo=dt.timezone.utc),
    )
    message = message_from_document(doc)
    assert message.data == b'{"id":7}'
    assert message.ordering_key == "order-7"
    assert list(message.attributes.items()) == [
        ("tenant", "acme"),
        ("outbox_event_id", "65f000000000000000000001"),
        ("outbox_event_type", "OrderCreated"),
        ("outbox_created_at", "2026-11-28T01:02:03.456Z"),
    ]
    assert RelayConfig(database="d").format is OUTBOX


def test_cloudevents_attributes_of_a_document():
    doc = build_document(
        "OrderCreated",
        "hi",
        topic="orders",
        event_id=ObjectId("65f000000000000000000001"),
        created_at=dt.datetime(2026, 11, 28, 1, 2, 3, 456000, tzinfo=dt.timezone.utc),
    )
    message = message_from_document(doc, fmt=MessageFormat("urn:shop", replay=True))
    assert dict(message.attributes) == {
        "outbox_event_id": "65f000000000000000000001",
        "ce-specversion": "1.0",
        "ce-id": "65f000000000000000000001",
        "ce-type": "OrderCreated",
        "ce-source": "urn:shop",
        "ce-time": "2026-11-28T01:02:03.456Z",
        "content-type": "text/plain; charset=utf-8",
        "outbox_replay": "1",
    }


@pytest.mark.parametrize("name", ["ce-subject", "CE-Foo", "content-type", "Content-Type"])
def test_cloudevents_attribute_names_are_refused_at_emit(name):
    with pytest.raises(ValidationError, match="reserved by the CloudEvents format"):
        build_document("T", b"", attributes={name: "x"})


def test_emit_leaves_room_for_the_wider_format_and_a_replay_mark():
    build_document("T", b"", attributes={f"a{i}": "v" for i in range(90)})
    with pytest.raises(ValidationError, match=r"91 attributes given.*at most 90"):
        build_document("T", b"", attributes={f"a{i}": "v" for i in range(91)})
    # Data that fits the outbox format but not the CloudEvents one with the longest source.
    room = MAX_MESSAGE_BYTES - MessageFormat().overhead - 1
    with pytest.raises(ValidationError, match="store the body elsewhere"):
        build_document("T", b"x" * room)
    fits = MAX_MESSAGE_BYTES - RESERVED_OVERHEAD - 1
    doc = build_document("T", b"x" * fits)
    for fmt in (OUTBOX, MessageFormat("s" * 1024, replay=True)):
        message = message_from_document(doc, "t", fmt)
        used = len(message.data) + sum(len(k) + len(v) for k, v in message.attributes.items())
        assert used <= MAX_MESSAGE_BYTES
        assert len(message.attributes) <= MAX_ATTRIBUTES


def test_a_document_with_cloudevents_names_is_poison_only_in_that_format():
    topic_doc = build_document("T", b"x", topic="orders")
    topic_doc["attributes"] = {"ce-subject": "written before the rule"}
    assert message_from_document(topic_doc).attributes["ce-subject"] == "written before the rule"
    with pytest.raises(PoisonEventError, match="reserved by the CloudEvents format"):
        message_from_document(topic_doc, fmt=MessageFormat("urn:x"))


def test_the_relay_sets_such_a_document_dead_and_goes_on(client, db_name, pubsub, relay_factory):
    topic, sub = pubsub.topic()
    bad = build_document("T", b"x", topic=topic, key="k")
    bad["attributes"] = {"ce-subject": "by hand"}
    client[db_name].outbox.insert_one(bad)
    with outbox_transaction(client, database=db_name) as tx:
        good = tx.emit("T", b"y", topic=topic, key="other")
    runner = relay_factory(db_name, start=False, message_format="cloudevents")
    runner.relay.run_once()
    assert [m.attributes["ce-id"] for m in sub.pull_until(1)] == [str(good)]
    dead = client[db_name].outbox.find_one({"_id": bad["_id"]})
    assert dead["status"] == "dead"
    assert "reserved by the CloudEvents format" in dead["last_error"]
    assert OutboxAdmin(client[db_name]).counts()["pending"] == 0


def test_relay_config_checks_the_format_at_once():
    with pytest.raises(ConfigurationError, match="unknown"):
        RelayConfig(database="d", message_format="xml")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="applies only to --message-format cloudevents"):
        RelayConfig(database="d", cloudevents_source="urn:x")
    for bad in ("", "a b", "a<b>", "{x}", "100%", "%zz"):
        with pytest.raises(ConfigurationError, match="not a URI-reference"):
            RelayConfig(database="d", message_format="cloudevents", cloudevents_source=bad)
    with pytest.raises(ConfigurationError, match="at most 1024"):
        RelayConfig(database="d", message_format="cloudevents", cloudevents_source="x" * 1025)
    config = RelayConfig(database="my db", collection="out/box", message_format="cloudevents")
    assert config.format.cloudevents_source == "mongo-outbox://my%20db/out%2Fbox"
    assert default_source("shop", "outbox") == "mongo-outbox://shop/outbox"


def test_an_empty_cloudevents_source_exits_2(capsys):
    from helpers import run_cli

    argv = ["relay", "--mongo-uri", "mongodb://127.0.0.1:1/", "--database", "d", "--project"]
    code, _, err = run_cli(
        [*argv, "p", "--message-format", "cloudevents", "--cloudevents-source", ""], capsys
    )
    assert code == 2
    assert "not a URI-reference" in err
