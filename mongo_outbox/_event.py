"""Events: payload encoding, validation against Pub/Sub limits, outbox documents, messages.

Everything here is pure: no I/O, so both the write side and the relay share it.
"""

from __future__ import annotations

import base64
import calendar
import datetime as _dt
import decimal
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

from bson import Decimal128, ObjectId
from bson.int64 import Int64
from bson.tz_util import utc as _BSON_UTC

from ._errors import PoisonEventError, ValidationError
from ._formats import (
    ATTR_CREATED_AT,
    ATTR_EVENT_ID,
    ATTR_EVENT_TYPE,
    ATTR_REPLAY,
    CE_ID,
    CE_SOURCE,
    CE_SPECVERSION,
    CE_TIME,
    CE_TYPE,
    CONTENT_TYPE,
    JSON,
    OUTBOX,
    TEXT,
    WIDEST,
    MessageFormat,
)
from ._partition import slot_for

__all__ = [
    "ATTR_CREATED_AT",
    "ATTR_EVENT_ID",
    "ATTR_EVENT_TYPE",
    "ATTR_TRACEPARENT",
    "ATTR_TRACESTATE",
    "EVENT_SPEC",
    "MAX_ATTRIBUTES",
    "MAX_MESSAGE_BYTES",
    "MAX_ORDERING_KEY_BYTES",
    "MAX_TRACESTATE_BYTES",
    "EventSpec",
    "Message",
    "build_document",
    "encode_payload",
    "format_timestamp",
    "is_traceparent",
    "message_from_document",
    "resolve_event",
]

# The event's W3C trace context, under the names google-cloud-pubsub's own tracing uses.
ATTR_TRACEPARENT = "googclient_traceparent"
ATTR_TRACESTATE = "googclient_tracestate"
#: Attribute names of the outbox format, the replay mark and the trace context; user
#: attributes may not use them, nor the CloudEvents format's (``ce-*``, ``content-type``).
RESERVED_ATTRIBUTES = frozenset(
    {
        ATTR_EVENT_ID,
        ATTR_EVENT_TYPE,
        ATTR_CREATED_AT,
        ATTR_TRACEPARENT,
        ATTR_TRACESTATE,
        ATTR_REPLAY,
    }
)
#: A stored tracestate is cut (whole list members from the end, as W3C allows) to this size.
MAX_TRACESTATE_BYTES = 512
_TRACEPARENT_BYTES = 55  # version 00: "00-<32 hex>-<16 hex>-<2 hex>"
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# W3C tracestate: comma-separated key=value list members (value: printable, no "," or "=").
_TRACESTATE_MEMBER = (
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}="
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TRACESTATE_RE = re.compile(rf"{_TRACESTATE_MEMBER}(?:[ \t]*,[ \t]*{_TRACESTATE_MEMBER})*")

#: Pub/Sub limits (https://cloud.google.com/pubsub/quotas#resource_limits).
MAX_MESSAGE_BYTES = 10_000_000
MAX_ATTRIBUTES = 100
MAX_ORDERING_KEY_BYTES = 1024
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_TYPE_BYTES = MAX_ATTRIBUTE_VALUE_BYTES

STATUS_PENDING = "pending"
STATUS_PUBLISHED = "published"
STATUS_DEAD = "dead"

# A topic id, or a full "projects/<p>/topics/<t>" path.
_TOPIC_ID = r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}"
_TOPIC_RE = re.compile(rf"(?:projects/[a-z][a-z0-9\-.:]{{4,62}}/topics/)?{_TOPIC_ID}")
# Topics that passed check_topic: the relay checks every document it reads.
_GOOD_TOPICS: set[str] = set()


def _json_default(value: Any) -> Any:
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, _dt.datetime):
        return format_timestamp(value)
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, Decimal128):
        return str(value.to_decimal())
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)  # the same set must encode to the same bytes every time
        except TypeError:
            return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def encode_payload(payload: Mapping[str, Any] | bytes | str) -> bytes:
    """Encode a payload as the bytes to publish.

    ``dict`` becomes compact UTF-8 JSON (ObjectId and UUID as strings, datetime as ISO 8601 UTC,
    Decimal/Decimal128 as decimal strings, bytes as base64); ``bytes`` pass as they are; ``str``
    is encoded as UTF-8.
    """
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return _encode_text(payload, "payload")
    if isinstance(payload, Mapping):
        try:
            text = json.dumps(
                dict(payload),
                default=_json_default,
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
            )
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValidationError(
                f"payload cannot be encoded as JSON: {exc}; pass JSON-compatible values "
                "(or ObjectId, datetime, Decimal, UUID), or encode it yourself and pass bytes"
            ) from exc
        return _encode_text(text, "payload")
    raise ValidationError(f"payload must be a dict, bytes or str, not {type(payload).__name__}")


def format_timestamp(value: _dt.datetime) -> str:
    """ISO 8601 in UTC with millisecond precision, e.g. ``2026-11-27T06:37:30.123Z``.

    Naive datetimes are taken as UTC (PyMongo returns naive UTC by default).
    """
    offset = value.utcoffset()
    if offset:
        value = value - offset
    # Formatting the naive value skips a timezone conversion on the relay's hot path.
    return value.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def utcnow() -> _dt.datetime:
    """Now in UTC, truncated to the millisecond that BSON datetimes keep."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: _dt.datetime) -> _dt.datetime:
    """An aware UTC datetime (PyMongo hands out naive UTC unless ``tz_aware``)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=_dt.timezone.utc)
    return value


def age_of(value: Any) -> float | None:
    """Seconds since ``value`` (None when it is not a datetime)."""
    if not isinstance(value, _dt.datetime):
        return None
    age: float = (_dt.datetime.now(_dt.timezone.utc) - as_utc(value)).total_seconds()
    return age


def _encode_text(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"{what} is not valid Unicode ({exc.reason} at index {exc.start}): "
            "a lone surrogate cannot be encoded as UTF-8"
        ) from exc


def _utf8_len(value: str, what: str = "a string") -> int:
    if value.isascii():  # the common case, and no lone surrogate is ASCII
        return len(value)
    return len(_encode_text(value, what))


def _check_type(event_type: Any) -> int:
    """The size in bytes of a valid event type."""
    if not isinstance(event_type, str) or not event_type:
        raise ValidationError(f"event type must be a non-empty str, got {event_type!r}")
    size = _utf8_len(event_type, "event type")
    if size > MAX_TYPE_BYTES:
        raise ValidationError(
            f"event type is longer than {MAX_TYPE_BYTES} bytes (it is sent as an attribute value)"
        )
    return size


def check_topic(topic: Any) -> str | None:
    """Return ``topic`` if it is None or a valid Pub/Sub topic id or path."""
    if topic is None:
        return None
    if isinstance(topic, str) and topic in _GOOD_TOPICS:
        return topic
    if not isinstance(topic, str) or not _TOPIC_RE.fullmatch(topic):
        raise ValidationError(
            f"invalid topic {topic!r}: use a topic id (3-255 characters: letters, digits, "
            "- _ . ~ + %, starting with a letter) or projects/<project>/topics/<id>"
        )
    if topic.rsplit("/", 1)[-1].startswith("goog"):
        raise ValidationError(f"invalid topic {topic!r}: topic ids must not start with 'goog'")
    if len(_GOOD_TOPICS) < 4096:  # a few topics in practice; the bound keeps memory flat
        _GOOD_TOPICS.add(topic)
    return topic


def _check_key(key: Any) -> tuple[str | None, int]:
    """The ordering key, checked, and its size in bytes."""
    if key is None:
        return None, 0
    if not isinstance(key, str) or not key:
        raise ValidationError(f"ordering key must be a non-empty str or None, got {key!r}")
    size = _utf8_len(key, "ordering key")
    if size > MAX_ORDERING_KEY_BYTES:
        raise ValidationError(
            f"ordering key is {size} bytes; Pub/Sub allows at most "
            f"{MAX_ORDERING_KEY_BYTES}: use a shorter key (a hash of it, for instance)"
        )
    return key, size


def _check_attributes(
    attributes: Any, added: int, cloudevents: bool = True
) -> tuple[dict[str, str], int]:
    """The attributes, checked, and their size in bytes (names plus values); ``added`` is how
    many attributes mongo-outbox adds to them, ``cloudevents`` whether the names of that format
    are refused (always at ``emit``; by the relay only in that format, so documents written
    before keep their attributes in the outbox format)."""
    if not attributes and (attributes is None or isinstance(attributes, Mapping)):
        return {}, 0
    if not isinstance(attributes, Mapping):
        raise ValidationError(
            f"attributes must be a dict of str to str, not {type(attributes).__name__}"
        )
    limit = MAX_ATTRIBUTES - added
    if len(attributes) > limit:
        raise ValidationError(
            f"{len(attributes)} attributes given; Pub/Sub allows {MAX_ATTRIBUTES} per message "
            f"and mongo-outbox may add {added} (its format's, the replay mark and the trace "
            "context), "
            f"so at most {limit}: move the rest into the payload"
        )
    checked: dict[str, str] = {}
    size = 0
    for name, value in attributes.items():
        if not isinstance(name, str) or not name:
            raise ValidationError(f"attribute keys must be non-empty str, got {name!r}")
        if not isinstance(value, str):
            raise ValidationError(f"attribute {name!r} must be a str, not {type(value).__name__}")
        if "\x00" in name:
            # Attribute names are BSON field names, which end at the first NUL byte.
            raise ValidationError(
                f"attribute key {name!r} contains a NUL character (\\x00), which MongoDB cannot "
                "store in a field name: remove it"
            )
        if name in RESERVED_ATTRIBUTES:
            raise ValidationError(f"attribute key {name!r} is reserved by mongo-outbox: rename it")
        if cloudevents and (name[:3].lower() == "ce-" or name.lower() == CONTENT_TYPE):
            raise ValidationError(
                f"attribute key {name!r} is reserved by the CloudEvents format (ce-*, "
                "content-type): rename it"
            )
        if name.startswith("goog"):
            raise ValidationError(
                f"attribute key {name!r} starts with 'goog', which Pub/Sub reserves: rename it"
            )
        name_bytes = _utf8_len(name, f"attribute key {name!r}")
        if name_bytes > MAX_ATTRIBUTE_KEY_BYTES:
            raise ValidationError(
                f"attribute key {name[:40]!r}... is longer than {MAX_ATTRIBUTE_KEY_BYTES} bytes"
            )
        value_bytes = _utf8_len(value, f"attribute {name!r}")
        if value_bytes > MAX_ATTRIBUTE_VALUE_BYTES:
            raise ValidationError(
                f"attribute {name!r} has a value longer than {MAX_ATTRIBUTE_VALUE_BYTES} bytes: "
                "move it into the payload"
            )
        checked[name] = value
        size += name_bytes + value_bytes
    return checked, size


# What emit reserves: the attributes and bytes of the wider format (CloudEvents with the
# longest source), replayed, with the longest trace context kept; the type's length is added
# per event. The relay counts only what its format and the document's trace context take, so
# documents written before are not refused for room they do not use.
_TRACE_OVERHEAD = (
    len(ATTR_TRACEPARENT) + len(ATTR_TRACESTATE) + _TRACEPARENT_BYTES + MAX_TRACESTATE_BYTES
)
_RESERVED_OVERHEAD = WIDEST.overhead + _TRACE_OVERHEAD
_RESERVED_COUNT = WIDEST.added + 2


class _CheckedEvent(NamedTuple):
    event_type: str
    topic: str | None
    key: str | None
    attributes: dict[str, str]
    data: bytes
    #: Bytes of data, ordering key and attributes, counting the reserved ones as ``reserve``.
    size: int


_new_tuple = tuple.__new__


def _check_event(
    event_type: Any,
    payload: Any,
    topic: Any,
    key: Any,
    attributes: Any,
    reserve: int = _RESERVED_OVERHEAD,
    added: int = _RESERVED_COUNT,
    cloudevents: bool = True,
) -> _CheckedEvent:
    """Every rule an event must meet to be published, shared by ``emit`` and the relay.

    The relay checks every event it reads, so the common shapes (an ASCII ``str`` type and key
    within their limits, no attributes, a ``bytes`` payload) take inline paths that give exactly
    what the full checks give; anything else goes through the full checks, in the same order.
    """
    if type(event_type) is str and 0 < len(event_type) <= MAX_TYPE_BYTES and event_type.isascii():
        type_bytes = len(event_type)  # ASCII: characters are bytes
    else:
        type_bytes = _check_type(event_type)
    if topic is not None:
        topic = check_topic(topic)
    if key is None:
        key_bytes = 0
    elif type(key) is str and 0 < len(key) <= MAX_ORDERING_KEY_BYTES and key.isascii():
        key_bytes = len(key)
    else:
        key, key_bytes = _check_key(key)
    if attributes is None or (type(attributes) is dict and not attributes):
        attrs: dict[str, str] = {}
        attrs_bytes = 0
    else:
        attrs, attrs_bytes = _check_attributes(attributes, added, cloudevents)
    data = payload if type(payload) is bytes else encode_payload(payload)
    size = len(data) + key_bytes + attrs_bytes + reserve + type_bytes
    if size > MAX_MESSAGE_BYTES:
        raise ValidationError(
            f"event {event_type!r} would make a {size:,}-byte message; Pub/Sub accepts at most "
            f"{MAX_MESSAGE_BYTES:,} bytes of data and attributes: store the body elsewhere "
            "and publish a reference to it"
        )
    # What _CheckedEvent(...) does, minus its Python-level __new__ (the relay checks every event).
    return _new_tuple(_CheckedEvent, (event_type, topic, key, attrs, data, size))


#: The class attribute where ``mongo_outbox.typed.event`` stores a model class's :class:`EventSpec`.
EVENT_SPEC = "__outbox_event__"


@dataclass(frozen=True, slots=True)
class EventSpec:
    """What ``@event`` declares of a model class: its type, topic and ordering key.

    ``key`` is a field name, a function of the model, or None (no ordering). Pure: the model is
    only duck-typed (``model_dump``), so the core needs no pydantic.
    """

    type: str
    topic: str | None
    key: str | Callable[[Any], Any] | None

    def key_of(self, model: Any) -> str | None:
        """The ordering key of ``model`` (a field's value, or the key function's result)."""
        if self.key is None:
            return None
        value = self.key(model) if callable(self.key) else getattr(model, self.key)
        if value is None:
            raise ValidationError(
                f"event {self.type!r} has no ordering key: "
                + (
                    f"its key function returned None for {model!r}"
                    if callable(self.key)
                    else f"field {self.key!r} is None"
                )
            )
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, float)) or not isinstance(value, (int, uuid.UUID, ObjectId)):
            raise ValidationError(
                f"event {self.type!r}: the ordering key must be a str (an int, UUID or ObjectId "
                f"is turned into one), got {type(value).__name__}"
            )
        return str(value)


def resolve_event(event: Any, payload: Any, topic: Any, key: Any) -> tuple[Any, Any, Any, Any]:
    """``(type, payload, topic, key)`` of an ``emit`` call: as given for a type string, from
    the class's ``@event`` declaration for a model (payload ``model_dump(mode="json")``).

    Raises :class:`ValidationError` at once on misuse: a model whose class is not declared, or
    a model given with a payload, topic or key (they come from the class).
    """
    if isinstance(event, str):
        return event, payload, topic, key
    # The class's own declaration: a subclass of an event class is not that event.
    spec = type(event).__dict__.get(EVENT_SPEC)
    if not isinstance(spec, EventSpec):
        raise ValidationError(
            f"cannot emit a {type(event).__name__}: pass an event type (str) and a payload, or "
            "a model whose class is declared with @mongo_outbox.typed.event(...)"
        )
    given = [
        name
        for name, value in (("a payload", payload), ("topic=", topic), ("key=", key))
        if value is not None
    ]
    if given:
        raise ValidationError(
            f"emit({type(event).__name__}(...)) takes no {' or '.join(given)}: the model is "
            f"its own payload, and @event on {type(event).__name__} names its topic and key"
        )
    return spec.type, event.model_dump(mode="json"), spec.topic, spec.key_of(event)


def build_document(
    event_type: Any,
    payload: Any,
    *,
    topic: Any = None,
    key: Any = None,
    attributes: Any = None,
    event_id: ObjectId | None = None,
    created_at: _dt.datetime | None = None,
    trace: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate an event and return its outbox document (raises :class:`ValidationError`).

    ``trace`` is the W3C context to store (``traceparent``, optional ``tracestate``).
    """
    event = _check_event(event_type, payload, topic, key, attributes)
    event_id = event_id if event_id is not None else ObjectId()
    doc = {
        "_id": event_id,
        "type": event.event_type,
        "topic": event.topic,
        "key": event.key,
        "payload": event.data,
        "attributes": event.attributes,
        "created_at": created_at if created_at is not None else utcnow(),
        "status": STATUS_PENDING,
        "attempts": 0,
        "slot": slot_for(event.key, event_id),
    }
    if isinstance(payload, Mapping):
        doc["content_type"] = JSON
    elif isinstance(payload, str):
        doc["content_type"] = TEXT
    if trace is not None:
        doc["trace"] = dict(trace)
    return doc


@dataclass(frozen=True, slots=True)
class Message:
    """A message ready to publish: what the relay hands to a :class:`Publisher`."""

    event_id: ObjectId
    topic: str | None
    data: bytes
    ordering_key: str | None
    attributes: Mapping[str, str]
    #: Bytes of data, ordering key and attributes (0: not computed).
    size: int = 0


def message_from_document(
    doc: Mapping[str, Any], default_topic: str | None = None, fmt: MessageFormat = OUTBOX
) -> Message:
    """Turn an outbox document into a :class:`Message` in format ``fmt``, its topic
    ``default_topic`` if it has none.

    Raises :class:`PoisonEventError` naming what is wrong when the document cannot be published
    (written by hand, by another program or by an incompatible version): the fields must have
    their types and pass every check ``emit`` makes, Pub/Sub's limits included.
    """
    event_id = doc.get("_id")
    if not isinstance(event_id, ObjectId):
        raise PoisonEventError(f"_id must be an ObjectId, got {type(event_id).__name__}")
    event_type = doc.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise PoisonEventError(f"field 'type' must be a non-empty string, got {event_type!r}")
    payload = doc.get("payload")
    if not isinstance(payload, bytes):
        raise PoisonEventError(f"field 'payload' must be binary data, got {type(payload).__name__}")
    created_at = doc.get("created_at")
    if not isinstance(created_at, _dt.datetime):
        raise PoisonEventError(
            f"field 'created_at' must be a date, got {type(created_at).__name__}"
        )
    trace_attributes: dict[str, str] = {}
    trace = doc.get("trace")
    if trace is None:
        reserve = fmt.overhead
    else:
        _add_trace_attributes(trace_attributes, trace)
        reserve = fmt.overhead + sum(len(k) + len(v) for k, v in trace_attributes.items())
    try:
        event = _check_event(
            event_type,
            payload,
            doc.get("topic"),
            doc.get("key"),
            doc.get("attributes"),
            reserve,
            fmt.added + len(trace_attributes),
            fmt.cloudevents_source is not None,
        )
    except ValidationError as exc:
        raise PoisonEventError(str(exc)) from exc
    tz = created_at.tzinfo
    if tz is None or tz is _BSON_UTC or tz is _dt.timezone.utc:
        # format_timestamp's text, from a cache of whole seconds (most events share one).
        created = f"{utc_second(created_at)[0]}.{created_at.microsecond // 1000:03d}Z"
    else:
        created = format_timestamp(created_at)
    if fmt is not OUTBOX:
        attributes = _format_attributes(fmt, doc, event, str(event_id), created)
    elif event.attributes:
        attributes = dict(event.attributes)
        attributes[ATTR_EVENT_ID] = str(event_id)
        attributes[ATTR_EVENT_TYPE] = event_type
        attributes[ATTR_CREATED_AT] = created
    else:
        attributes = {
            ATTR_EVENT_ID: str(event_id),
            ATTR_EVENT_TYPE: event_type,
            ATTR_CREATED_AT: created,
        }
    if trace_attributes:
        attributes.update(trace_attributes)
    topic = event.topic if event.topic is not None else default_topic
    return Message(event_id, topic, payload, event.key, attributes, event.size)


def _format_attributes(
    fmt: MessageFormat, doc: Mapping[str, Any], event: _CheckedEvent, event_id: str, created: str
) -> dict[str, str]:
    """The attributes of ``fmt`` other than the default one (CloudEvents, or a replay)."""
    attributes = dict(event.attributes)
    attributes[ATTR_EVENT_ID] = event_id
    if fmt.cloudevents_source is None:
        attributes[ATTR_EVENT_TYPE] = event.event_type
        attributes[ATTR_CREATED_AT] = created
    else:
        attributes[CE_SPECVERSION] = "1.0"
        attributes[CE_ID] = event_id
        attributes[CE_TYPE] = event.event_type
        attributes[CE_SOURCE] = fmt.cloudevents_source
        attributes[CE_TIME] = created
        content_type = doc.get("content_type")
        if content_type in (JSON, TEXT):
            attributes[CONTENT_TYPE] = content_type
    if fmt.replay:
        attributes[ATTR_REPLAY] = "1"
    return attributes


# The relay formats the created_at of every event it reads, and most events of a batch share a
# second: whole UTC seconds, by (year, month, day, hour, minute, second), with their ISO 8601
# text and their seconds since the epoch. Bounded; a race between threads only recomputes.
_UTC_SECONDS: dict[tuple[int, int, int, int, int, int], tuple[str, int]] = {}


def utc_second(value: _dt.datetime) -> tuple[str, int]:
    """The whole second of ``value`` (naive UTC, or aware in UTC): its ISO 8601 text (to the
    seconds, no zone) and its seconds since the epoch."""
    key = (value.year, value.month, value.day, value.hour, value.minute, value.second)
    known = _UTC_SECONDS.get(key)
    if known is None:
        second = value.replace(microsecond=0, tzinfo=None)
        known = (second.isoformat(), calendar.timegm(second.timetuple()))
        if len(_UTC_SECONDS) >= 4096:
            _UTC_SECONDS.clear()
        _UTC_SECONDS[key] = known
    return known


def is_traceparent(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is a W3C ``traceparent`` this library would store (version 00 form)."""
    return (
        isinstance(value, str)
        and _TRACEPARENT_RE.fullmatch(value) is not None
        and not value.startswith("ff")
        and value[3:35] != "0" * 32
        and value[36:52] != "0" * 16
    )


def _add_trace_attributes(attributes: dict[str, str], trace: Any) -> None:
    """Add a stored trace context as attributes; a malformed one is left out, never poison."""
    if not isinstance(trace, Mapping):
        return
    traceparent = trace.get("traceparent")
    if not is_traceparent(traceparent):
        return
    attributes[ATTR_TRACEPARENT] = traceparent
    tracestate = trace.get("tracestate")
    if (
        isinstance(tracestate, str)
        and len(tracestate) <= MAX_TRACESTATE_BYTES
        and _TRACESTATE_RE.fullmatch(tracestate)
    ):
        attributes[ATTR_TRACESTATE] = tracestate


def attempts_of(doc: Mapping[str, Any]) -> int:
    """The ``attempts`` counter of a document, tolerating a missing or odd value."""
    value = doc.get("attempts", 0)
    if isinstance(value, (int, Int64)) and not isinstance(value, bool):
        return int(value)
    return 0
