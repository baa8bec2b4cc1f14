"""Unit tests of events: payload encoding, Pub/Sub limits, outbox documents, messages; no I/O."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import types
import uuid

import pytest
from bson import Decimal128, ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

import mongo_outbox
from mongo_outbox import PoisonEventError, ValidationError
from mongo_outbox._document import STATUS_PENDING, attempts_of, build_document
from mongo_outbox._formats import OUTBOX, MessageFormat
from mongo_outbox._limits import (
    MAX_ATTRIBUTES,
    MAX_MESSAGE_BYTES,
    RESERVED_ATTRIBUTES,
    RESERVED_OVERHEAD,
    check_event,
    check_event_in_full,
    check_topic,
)
from mongo_outbox._message import Message, message_from_document
from mongo_outbox._payload import encode_payload
from mongo_outbox._times import format_timestamp
from mongo_outbox._trace_context import MAX_TRACESTATE_BYTES

UTC = dt.timezone.utc


def _size(message: Message) -> int:
    """Pub/Sub size of a message as the library counts it: data, attributes, ordering key."""
    size = len(message.data)
    size += sum(len(k.encode()) + len(v.encode()) for k, v in message.attributes.items())
    if message.ordering_key:
        size += len(message.ordering_key.encode())
    return size


# The longest trace context a document can carry: what the size rule reserves room for.
_MAX_TRACESTATE = ",".join([f"v{i:02d}=" + "x" * 120 for i in range(4)] + ["v04=" + "x" * 8])
_MAX_TRACE = {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01", "tracestate": _MAX_TRACESTATE}
assert len(_MAX_TRACESTATE) == MAX_TRACESTATE_BYTES


def _doc(**overrides):
    doc = build_document(
        "OrderCreated",
        {"id": 7},
        topic="orders",
        key="order-7",
        attributes={"tenant": "acme"},
        created_at=dt.datetime(2026, 11, 27, 6, 37, 30, 123000, tzinfo=UTC),
    )
    doc.update(overrides)
    return doc


# -- payload encoding ------------------------------------------------------------------------


def test_dict_payload_is_compact_utf8_json():
    data = encode_payload({"id": 7, "items": [1, 2], "nested": {"a": None, "b": True}})
    assert data == b'{"id":7,"items":[1,2],"nested":{"a":null,"b":true}}'


def test_encode_payload_is_public():
    assert mongo_outbox.encode_payload is encode_payload


def test_non_ascii_is_kept_as_utf8_not_escaped():
    data = encode_payload({"name": "Zoë 東京 ✓"})
    assert b"\\u" not in data
    assert data == '{"name":"Zoë 東京 ✓"}'.encode()
    assert json.loads(data.decode("utf-8")) == {"name": "Zoë 東京 ✓"}


def test_bson_and_python_types_are_rendered():
    oid = ObjectId("65f000000000000000000001")
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    payload = {
        "oid": oid,
        "naive": dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
        "aware": dt.datetime(
            2024, 1, 2, 5, 4, 5, 999999, tzinfo=dt.timezone(dt.timedelta(hours=2))
        ),
        "utc": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "day": dt.date(2024, 1, 2),
        "d128": Decimal128("1.10"),
        "dec": decimal.Decimal("-0.000123"),
        "uuid": uid,
        "raw": b"\x00\xffhi",
        "set": {3},
        "tuple": (1, "a"),
    }
    decoded = json.loads(encode_payload(payload))
    assert decoded == {
        "oid": "65f000000000000000000001",
        "naive": "2024-01-02T03:04:05.123Z",
        "aware": "2024-01-02T03:04:05.999Z",
        "utc": "2024-01-02T03:04:05.000Z",
        "day": "2024-01-02",
        "d128": "1.10",
        "dec": "-0.000123",
        "uuid": "12345678-1234-5678-1234-567812345678",
        "raw": "AP9oaQ==",
        "set": [3],
        "tuple": [1, "a"],
    }


def test_bytes_payload_passes_as_is():
    raw = b"\x00\x01\xfe\xff not json"
    assert encode_payload(raw) == raw
    assert encode_payload(bytearray(b"ab")) == b"ab"
    assert encode_payload(memoryview(b"cd")) == b"cd"


def test_str_payload_is_utf8():
    assert encode_payload("héllo ✓") == "héllo ✓".encode()
    assert encode_payload("") == b""


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"x": object()}, r"not JSON serializable"),
        ({"x": {"y": [object()]}}, r"type object is not JSON serializable"),
        ({"x": float("nan")}, r"float values are not JSON compliant"),
        ({"x": float("inf")}, r"float values are not JSON compliant"),
        ({("a", "b"): 1}, r"keys must be str"),
    ],
    ids=["object", "nested-object", "nan", "inf", "tuple-key"],
)
def test_unencodable_dict_payload_is_a_validation_error(payload, match):
    with pytest.raises(ValidationError, match=match) as info:
        encode_payload(payload)
    assert "payload cannot be encoded as JSON" in str(info.value)
    assert isinstance(info.value.__cause__, (TypeError, ValueError))


def test_circular_payload_is_a_validation_error():
    payload: dict = {}
    payload["self"] = payload
    with pytest.raises(ValidationError, match="Circular reference"):
        encode_payload(payload)


@pytest.mark.parametrize(
    ("payload", "name"),
    [(42, "int"), ([1, 2], "list"), (None, "NoneType"), (1.5, "float"), ({1}, "set")],
)
def test_wrong_payload_type_is_a_validation_error(payload, name):
    with pytest.raises(ValidationError, match=rf"payload must be a dict, bytes or str, not {name}"):
        encode_payload(payload)
    with pytest.raises(ValidationError, match="payload must be"):
        build_document("T", payload)


# A lone surrogate cannot be encoded as UTF-8: it must be a ValidationError, not a bare
# UnicodeEncodeError escaping from emit (found by these tests, fixed in _event._encode_text).
@pytest.mark.parametrize("payload", ["\ud800", {"x": "\ud800"}], ids=["str", "dict"])
def test_lone_surrogate_payload_is_a_validation_error(payload):
    with pytest.raises(ValidationError, match="payload is not valid Unicode") as info:
        encode_payload(payload)
    assert isinstance(info.value.__cause__, UnicodeEncodeError)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"event_type": "T\udc00"}, "event type"),
        ({"key": "k\udc00"}, "ordering key"),
        ({"attributes": {"a": "v\udc00"}}, "attribute 'a'"),
        ({"attributes": {"a\udc00": "v"}}, "attribute key"),
    ],
    ids=["type", "key", "attr-value", "attr-key"],
)
def test_lone_surrogate_in_metadata_is_a_validation_error(kwargs, what):
    event_type = kwargs.pop("event_type", "T")
    with pytest.raises(ValidationError, match="not valid Unicode") as info:
        build_document(event_type, b"x", **kwargs)
    assert str(info.value).startswith(what)


def test_non_dict_mapping_payload_is_encoded():
    # Any Mapping is accepted, at the top level and nested.
    inner = types.MappingProxyType({"b": 2})
    assert encode_payload(types.MappingProxyType({"a": 1, "m": inner})) == (b'{"a":1,"m":{"b":2}}')


# -- message size ----------------------------------------------------------------------------


# The widest message emit makes room for: CloudEvents with the longest source, replayed.
WIDE = MessageFormat("s" * 1024, replay=True)


def test_reserved_overhead_matches_the_real_attributes():
    # The constant is what the added and trace attributes cost at most, minus the type's value
    # (a str payload: its content-type is the longest one emit stores).
    doc = build_document("T", "", trace=_MAX_TRACE)
    message = message_from_document(doc, fmt=WIDE)
    assert len(message.attributes) == 10
    cost = sum(len(k) + len(v) for k, v in message.attributes.items())
    assert cost == RESERVED_OVERHEAD + len("T")
    assert OUTBOX.overhead < RESERVED_OVERHEAD


def _max_data(event_type: str, key: str | None = None, attributes=None) -> int:
    used = RESERVED_OVERHEAD + len(event_type.encode())
    used += len(key.encode()) if key else 0
    used += sum(len(k.encode()) + len(v.encode()) for k, v in (attributes or {}).items())
    return MAX_MESSAGE_BYTES - used


def test_message_at_the_size_limit_is_accepted():
    assert MAX_MESSAGE_BYTES == 10_000_000
    n = _max_data("Big")
    doc = build_document("Big", "x" * n, trace=_MAX_TRACE)
    assert len(doc["payload"]) == n
    assert _size(message_from_document(doc, fmt=WIDE)) == MAX_MESSAGE_BYTES


def test_message_one_byte_over_the_limit_is_rejected():
    n = _max_data("Big") + 1
    with pytest.raises(ValidationError, match=r"10,000,001-byte message.*at most 10,000,000"):
        build_document("Big", b"x" * n)


def test_size_limit_counts_key_and_attribute_bytes_in_utf8():
    key = "ключ"  # 8 bytes
    attributes = {"région": "东京"}  # 7 + 6 bytes
    n = _max_data("Big", key, attributes)
    assert n == MAX_MESSAGE_BYTES - RESERVED_OVERHEAD - 3 - 8 - 13
    doc = build_document("Big", "x" * n, key=key, attributes=attributes, trace=_MAX_TRACE)
    assert _size(message_from_document(doc, fmt=WIDE)) == MAX_MESSAGE_BYTES
    with pytest.raises(ValidationError, match="10,000,001-byte"):
        build_document("Big", b"x" * (n + 1), key=key, attributes=attributes)


def test_oversized_dict_payload_is_rejected():
    with pytest.raises(ValidationError, match="store the body elsewhere"):
        build_document("Big", {"blob": "a" * MAX_MESSAGE_BYTES})


def test_pubsub_request_chunks_stay_within_the_request_limit_in_utf8_bytes():
    # Same byte accounting as build_document: it is what Pub/Sub counts.
    from mongo_outbox.publishers._pubsub import _chunks

    attributes = {f"k{i}": "é" * 512 for i in range(90)}  # 90 x 1026 bytes, 90 x 514 chars
    doc = build_document("T", b"x" * 8000, key="k", attributes=attributes, trace=_MAX_TRACE)
    messages = [message_from_document(doc) for _ in range(300)]
    chunks = _chunks(messages, list(range(len(messages))))
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(messages)))
    for chunk in chunks:
        assert sum(_size(messages[i]) for i in chunk) <= MAX_MESSAGE_BYTES


# -- attributes ------------------------------------------------------------------------------


def test_90_user_attributes_are_accepted_and_room_is_left_for_every_added_attribute():
    attributes = {f"a{i}": str(i) for i in range(90)}
    doc = build_document("T", "x", attributes=attributes, trace=_MAX_TRACE)
    assert doc["attributes"] == attributes
    assert len(message_from_document(doc).attributes) == 95
    message = message_from_document(doc, fmt=WIDE)
    assert len(message.attributes) == MAX_ATTRIBUTES == 100


def test_91_user_attributes_are_rejected():
    attributes = {f"a{i}": str(i) for i in range(91)}
    with pytest.raises(ValidationError, match=r"91 attributes given.*allows 100.*at most 90"):
        build_document("T", b"x", attributes=attributes)


@pytest.mark.parametrize("name", ["goog", "googAttr", "goog-x"])
def test_attribute_key_starting_with_goog_is_rejected(name):
    with pytest.raises(ValidationError, match=rf"{name!r} starts with 'goog'"):
        build_document("T", b"x", attributes={name: "v"})


def test_attribute_key_with_goog_inside_is_accepted():
    doc = build_document("T", b"x", attributes={"xgoog": "v", "Goog": "w"})
    assert doc["attributes"] == {"xgoog": "v", "Goog": "w"}


@pytest.mark.parametrize("name", sorted(RESERVED_ATTRIBUTES))
def test_reserved_attribute_keys_are_rejected(name):
    with pytest.raises(ValidationError, match=rf"{name!r} is reserved by mongo-outbox"):
        build_document("T", b"x", attributes={name: "v"})


@pytest.mark.parametrize(
    ("value", "name"), [(1, "int"), (None, "NoneType"), (b"v", "bytes"), (["v"], "list")]
)
def test_non_str_attribute_values_are_rejected(value, name):
    with pytest.raises(ValidationError, match=rf"attribute 'a' must be a str, not {name}"):
        build_document("T", b"x", attributes={"a": value})


@pytest.mark.parametrize("name", [1, "", None])
def test_bad_attribute_keys_are_rejected(name):
    with pytest.raises(ValidationError, match="attribute keys must be non-empty str"):
        build_document("T", b"x", attributes={name: "v"})


@pytest.mark.parametrize("name", ["a\x00b", "\x00", "tenant\x00"])
def test_attribute_key_with_nul_is_rejected(name):
    # BSON field names are NUL-terminated: such a key would abort the commit with bson's
    # InvalidDocument instead of failing at emit.
    with pytest.raises(ValidationError, match=r"contains a NUL character.*remove it") as info:
        build_document("T", b"x", attributes={name: "v"})
    assert repr(name) in str(info.value)


def test_nul_in_attribute_values_type_and_key_is_kept():
    # Values may hold NUL in BSON; only field names cannot.
    doc = build_document("T\x00", b"x", key="k\x00", attributes={"a": "v\x00"})
    message = message_from_document(doc)
    assert message.ordering_key == "k\x00"
    assert message.attributes["a"] == "v\x00"
    assert message.attributes["outbox_event_type"] == "T\x00"


def test_attributes_must_be_a_mapping():
    with pytest.raises(ValidationError, match="attributes must be a dict of str to str, not list"):
        build_document("T", b"x", attributes=[("a", "b")])


def test_attribute_key_and_value_byte_limits():
    build_document("T", b"x", attributes={"k" * 256: "v" * 1024})
    with pytest.raises(ValidationError, match="longer than 256 bytes"):
        build_document("T", b"x", attributes={"k" * 257: "v"})
    with pytest.raises(ValidationError, match="value longer than 1024 bytes"):
        build_document("T", b"x", attributes={"k": "é" * 513})


# -- ordering key, type, topic ----------------------------------------------------------------


def test_ordering_key_of_exactly_1024_bytes_is_accepted():
    key = "é" * 512  # 1024 UTF-8 bytes
    assert build_document("T", b"x", key=key)["key"] == key
    assert build_document("T", b"x", key="k" * 1024)["key"] == "k" * 1024


@pytest.mark.parametrize("key", ["k" * 1025, "é" * 512 + "k"], ids=["ascii", "utf8"])
def test_ordering_key_over_1024_bytes_is_rejected(key):
    with pytest.raises(ValidationError, match=r"ordering key is 1025 bytes.*at most 1024"):
        build_document("T", b"x", key=key)


@pytest.mark.parametrize("key", ["", 7, b"k"])
def test_empty_or_non_str_ordering_key_is_rejected(key):
    with pytest.raises(ValidationError, match="ordering key must be a non-empty str or None"):
        build_document("T", b"x", key=key)


@pytest.mark.parametrize("event_type", ["", None, 3])
def test_bad_event_type_is_rejected(event_type):
    with pytest.raises(ValidationError, match="event type must be a non-empty str"):
        build_document(event_type, b"x")


def test_event_type_longer_than_an_attribute_value_is_rejected():
    build_document("t" * 1024, b"x")
    with pytest.raises(ValidationError, match="event type is longer than 1024 bytes"):
        build_document("t" * 1025, b"x")


@pytest.mark.parametrize(
    "topic",
    [
        "orders",
        "abc",
        "Orders.v1_x-y~z+w%20",
        "a" * 255,
        "projects/p-123/topics/tpc",
        "projects/my-project/topics/orders",
        "projects/example.com:proj/topics/orders",
    ],
)
def test_valid_topics_are_accepted(topic):
    assert check_topic(topic) == topic
    assert build_document("T", b"x", topic=topic)["topic"] == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "ab",
        "1orders",
        "-orders",
        "a" * 256,
        "orders/x",
        "ord ers",
        "googtopic",
        "projects/p-123/topics/goog-x",
        "projects/p-123/topics/t",  # topic ids are 3-255 characters
        "projects/p-123/topics/",
        "projects/P-123/topics/orders",
        "projects//topics/orders",
        "projects/p-123/subscriptions/orders",
        "orders\n",
        7,
    ],
)
def test_bad_topics_are_rejected(topic):
    with pytest.raises(ValidationError, match="invalid topic"):
        check_topic(topic)
    with pytest.raises(ValidationError, match="invalid topic"):
        build_document("T", b"x", topic=topic)


def test_no_topic_means_the_relay_default():
    assert check_topic(None) is None
    assert build_document("T", b"x")["topic"] is None


# -- documents -------------------------------------------------------------------------------


def test_build_document_fields():
    before = dt.datetime.now(UTC) - dt.timedelta(milliseconds=1)
    doc = build_document(
        "OrderCreated",
        {"id": 7},
        topic="orders",
        key="order-7",
        attributes={"tenant": "acme"},
    )
    after = dt.datetime.now(UTC)
    assert set(doc) == {
        "_id",
        "type",
        "topic",
        "key",
        "payload",
        "attributes",
        "created_at",
        "status",
        "attempts",
        "slot",
        "content_type",
    }
    assert isinstance(doc["_id"], ObjectId)
    assert doc["type"] == "OrderCreated"
    assert doc["topic"] == "orders"
    assert doc["key"] == "order-7"
    assert isinstance(doc["payload"], bytes)
    assert doc["payload"] == b'{"id":7}'
    assert doc["attributes"] == {"tenant": "acme"}
    assert doc["status"] == "pending" == STATUS_PENDING
    assert doc["attempts"] == 0
    created = doc["created_at"]
    assert created.tzinfo is not None
    assert created.utcoffset() == dt.timedelta(0)
    assert created.microsecond % 1000 == 0
    assert before <= created <= after


def test_build_document_uses_given_id_and_time_and_fresh_ids_otherwise():
    oid = ObjectId()
    at = dt.datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC)
    doc = build_document("T", "text", event_id=oid, created_at=at)
    assert doc["_id"] == oid
    assert doc["created_at"] == at
    assert doc["payload"] == b"text"
    assert doc["attributes"] == {}
    assert doc["key"] is None
    assert build_document("T", b"")["_id"] != build_document("T", b"")["_id"]


def test_build_document_does_not_alias_the_callers_attributes():
    attributes = {"a": "1"}
    doc = build_document("T", b"x", attributes=attributes)
    attributes["b"] = "2"
    assert doc["attributes"] == {"a": "1"}


def test_format_timestamp():
    assert format_timestamp(dt.datetime(2026, 11, 27, 6, 37, 30, 123999)) == (
        "2026-11-27T06:37:30.123Z"
    )
    tz = dt.timezone(dt.timedelta(hours=-5))
    assert format_timestamp(dt.datetime(2026, 11, 27, 1, 37, 30, tzinfo=tz)) == (
        "2026-11-27T06:37:30.000Z"
    )


# -- messages --------------------------------------------------------------------------------


def test_message_from_document_attributes():
    doc = _doc()
    message = message_from_document(doc)
    assert isinstance(message, mongo_outbox.Message)
    assert message.event_id == doc["_id"]
    assert message.topic == "orders"
    assert message.data == b'{"id":7}'
    assert message.ordering_key == "order-7"
    assert dict(message.attributes) == {
        "tenant": "acme",
        "outbox_event_id": str(doc["_id"]),
        "outbox_event_type": "OrderCreated",
        "outbox_created_at": "2026-11-27T06:37:30.123Z",
    }
    assert len(message.attributes["outbox_event_id"]) == 24
    assert ObjectId(message.attributes["outbox_event_id"]) == doc["_id"]
    parsed = dt.datetime.fromisoformat(
        message.attributes["outbox_created_at"].replace("Z", "+00:00")
    )
    assert parsed == doc["created_at"]


def test_message_from_document_naive_created_at_is_utc():
    # PyMongo hands out naive UTC datetimes unless tz_aware=True.
    message = message_from_document(_doc(created_at=dt.datetime(2024, 2, 3, 4, 5, 6, 7000)))
    assert message.attributes["outbox_created_at"] == "2024-02-03T04:05:06.007Z"


def test_message_from_document_without_key_topic_or_attributes():
    doc = _doc(key=None, topic=None)
    del doc["attributes"]
    message = message_from_document(doc)
    assert message.ordering_key is None
    assert message.topic is None
    assert set(message.attributes) == {"outbox_event_id", "outbox_event_type", "outbox_created_at"}


def test_message_from_document_does_not_change_the_document():
    doc = _doc()
    message_from_document(doc)
    assert doc["attributes"] == {"tenant": "acme"}


def _without(field):
    doc = _doc()
    del doc[field]
    return doc


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (_without("type"), r"field 'type' must be a non-empty string, got None"),
        (_doc(type=""), r"field 'type' must be a non-empty string"),
        (_doc(type=5), r"field 'type' must be a non-empty string, got 5"),
        (_doc(payload="text"), r"field 'payload' must be binary data, got str"),
        (_doc(payload={"id": 7}), r"field 'payload' must be binary data, got dict"),
        (_without("payload"), r"field 'payload' must be binary data, got NoneType"),
        (_without("created_at"), r"field 'created_at' must be a date, got NoneType"),
        (_doc(created_at="2024-01-01"), r"field 'created_at' must be a date, got str"),
        (_doc(attributes=["a"]), r"attributes must be a dict of str to str, not list"),
        (_doc(attributes={"a": 1}), r"attribute 'a' must be a str"),
        (_doc(attributes={"outbox_event_id": "x"}), r"reserved by mongo-outbox"),
        (_doc(key="k" * 1025), r"ordering key is 1025 bytes"),
        (_doc(key=""), r"ordering key must be a non-empty str"),
        (_doc(topic="no"), r"invalid topic"),
        (_doc(_id="65f000000000000000000001"), r"_id must be an ObjectId, got str"),
        (_without("_id"), r"_id must be an ObjectId, got NoneType"),
    ],
    ids=[
        "type-missing",
        "type-empty",
        "type-int",
        "payload-str",
        "payload-dict",
        "payload-missing",
        "created-missing",
        "created-str",
        "attributes-list",
        "attribute-int",
        "attribute-reserved",
        "key-too-long",
        "key-empty",
        "topic-bad",
        "id-str",
        "id-missing",
    ],
)
def test_message_from_malformed_document_is_poison(doc, match):
    with pytest.raises(PoisonEventError, match=match):
        message_from_document(doc)


# Documents written by hand or by another program get the same checks emit makes.


def test_message_from_document_over_the_size_limit_is_poison():
    doc = _doc(payload=b"x" * 11_000_000)
    size = len(doc["payload"]) + len("order-7") + len("tenant") + len("acme")
    size += OUTBOX.overhead + len("OrderCreated")  # read: the trace it has (none) counts
    with pytest.raises(
        PoisonEventError, match=rf"{size:,}-byte message; Pub/Sub accepts at most 10,000,000"
    ):
        message_from_document(doc)


def test_message_from_document_at_the_size_limit_is_accepted():
    # emit reserves room for the longest trace context; the relay counts the one there is.
    doc = build_document("Big", b"x" * _max_data("Big"))
    assert message_from_document(doc).size < MAX_MESSAGE_BYTES
    doc["payload"] += b"x" * (RESERVED_OVERHEAD - OUTBOX.overhead)
    assert message_from_document(doc).size == MAX_MESSAGE_BYTES
    doc["payload"] += b"x"
    with pytest.raises(PoisonEventError, match="10,000,001-byte message"):
        message_from_document(doc)


def test_message_from_document_with_a_type_over_1024_bytes_is_poison():
    message = message_from_document(_doc(type="t" * 1024))
    assert message.attributes["outbox_event_type"] == "t" * 1024
    with pytest.raises(PoisonEventError, match="event type is longer than 1024 bytes"):
        message_from_document(_doc(type="t" * 1025))
    with pytest.raises(PoisonEventError, match="event type is longer than 1024 bytes"):
        message_from_document(_doc(type="é" * 513))


def test_message_from_document_with_nul_in_an_attribute_key_is_poison():
    with pytest.raises(PoisonEventError, match=r"'a\\x00b' contains a NUL character"):
        message_from_document(_doc(attributes={"a\x00b": "v"}))


def test_message_size_is_the_size_of_what_is_published():
    attributes = {"région": "东京"}
    doc = build_document("Tÿpe", b"x" * 10, key="ключ", attributes=attributes, trace=_MAX_TRACE)
    message = message_from_document(doc)
    assert message.size == _size(message)
    del doc["trace"]
    without = message_from_document(doc)
    assert without.size == _size(without) < message.size


def test_attempts_of_tolerates_odd_values():
    from bson.int64 import Int64

    assert attempts_of({}) == 0
    assert attempts_of({"attempts": 3}) == 3
    assert attempts_of({"attempts": Int64(4)}) == 4
    assert attempts_of({"attempts": True}) == 0
    assert attempts_of({"attempts": "2"}) == 0
    assert attempts_of({"attempts": None}) == 0


def test_documents_written_before_trace_attributes_were_reserved_are_still_published():
    # Earlier versions let 97 user attributes through: the relay counts only the trace
    # context a document really has.
    doc = _doc(attributes={f"a{i}": "v" for i in range(97)})
    assert len(message_from_document(doc).attributes) == 100
    doc["attributes"]["a97"] = "v"
    with pytest.raises(PoisonEventError, match="at most 97"):
        message_from_document(doc)


# -- the hot path's inline checks give exactly what the full checks give --------------------

# Around the edges the inline paths test: empty, ASCII or not, at and past the byte limits,
# lone surrogates, wrong types.
_texts = st.one_of(
    st.text(max_size=8),
    st.text(alphabet=st.characters(codec="ascii"), min_size=1000, max_size=1030),
    st.builds(
        lambda n, c: c * n, st.integers(1020, 1030), st.sampled_from(["a", "\xe9", "\ud800"])
    ),
)
_names = st.one_of(_texts, st.none(), st.integers(), st.binary(max_size=4))
_attributes = st.one_of(
    st.none(),
    st.just({}),
    st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers()), max_size=3),
    st.lists(st.text(max_size=3), max_size=2),
)
_payloads = st.one_of(
    st.binary(max_size=16),
    st.text(max_size=16),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.integers(),
)
_topics = st.one_of(
    st.none(), st.sampled_from(["orders", "goog-x", "a", "projects/proj-1/topics/t-1"])
)


_VALID = {"event_type": "E", "payload": b"x", "topic": None, "key": "k", "attributes": None}
_FIELDS = {
    "event_type": _names,
    "key": _names,
    "payload": _payloads,
    "topic": _topics,
    "attributes": _attributes,
}


@pytest.mark.parametrize("field", sorted(_FIELDS))
@settings(max_examples=150, deadline=None)
@given(data=st.data(), cloudevents=st.booleans())
def test_the_inline_checks_equal_the_full_checks(field, data, cloudevents):
    given_event = {**_VALID, field: data.draw(_FIELDS[field], label=field)}

    def outcome(check):
        try:
            return check(**given_event, cloudevents=cloudevents)
        except ValidationError as exc:
            return ("refused", str(exc))

    assert outcome(check_event) == outcome(check_event_in_full)


@settings(max_examples=300, deadline=None)
@given(_names, _payloads, _topics, _names, _attributes, st.booleans())
def test_the_inline_checks_equal_the_full_checks_all_at_once(
    event_type, payload, topic, key, attributes, cloudevents
):
    def outcome(check):
        try:
            return check(event_type, payload, topic, key, attributes, cloudevents=cloudevents)
        except ValidationError as exc:
            return ("refused", str(exc))

    assert outcome(check_event) == outcome(check_event_in_full)
