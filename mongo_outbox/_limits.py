"""Pub/Sub's limits, and the checks of an event against them shared by ``emit`` and the relay.

:func:`check_event` takes inline paths for the common shapes; :func:`check_event_in_full` is
the same rules without them, the reference a test holds the fast paths to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple, NoReturn

from ._errors import ValidationError
from ._formats import (
    ATTR_CREATED_AT,
    ATTR_EVENT_ID,
    ATTR_EVENT_TYPE,
    ATTR_REPLAY,
    CONTENT_TYPE,
    WIDEST,
)
from ._payload import encode_payload, utf8_len
from ._trace_context import ATTR_TRACEPARENT, ATTR_TRACESTATE, TRACE_OVERHEAD

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_MESSAGE_BYTES",
    "MAX_ORDERING_KEY_BYTES",
    "RESERVED_ATTRIBUTES",
    "RESERVED_COUNT",
    "RESERVED_OVERHEAD",
    "CheckedEvent",
    "check_event",
    "check_event_in_full",
    "check_topic",
]

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

#: Pub/Sub limits (https://cloud.google.com/pubsub/quotas#resource_limits).
MAX_MESSAGE_BYTES = 10_000_000
MAX_ATTRIBUTES = 100
MAX_ORDERING_KEY_BYTES = 1024
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_TYPE_BYTES = MAX_ATTRIBUTE_VALUE_BYTES

# A topic id, or a full "projects/<p>/topics/<t>" path.
_TOPIC_ID = r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}"
_TOPIC_RE = re.compile(rf"(?:projects/[a-z][a-z0-9\-.:]{{4,62}}/topics/)?{_TOPIC_ID}")
# Topics that passed check_topic: the relay checks every document it reads.
_GOOD_TOPICS: set[str] = set()


def _check_type(event_type: Any) -> int:
    """The size in bytes of a valid event type."""
    if not isinstance(event_type, str) or not event_type:
        raise ValidationError(f"event type must be a non-empty str, got {event_type!r}")
    size = utf8_len(event_type, "event type")
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
    size = utf8_len(key, "ordering key")
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
        name_bytes = utf8_len(name, f"attribute key {name!r}")
        if name_bytes > MAX_ATTRIBUTE_KEY_BYTES:
            raise ValidationError(
                f"attribute key {name[:40]!r}... is longer than {MAX_ATTRIBUTE_KEY_BYTES} bytes"
            )
        value_bytes = utf8_len(value, f"attribute {name!r}")
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
RESERVED_OVERHEAD = WIDEST.overhead + TRACE_OVERHEAD
RESERVED_COUNT = WIDEST.added + 2


class CheckedEvent(NamedTuple):
    event_type: str
    topic: str | None
    key: str | None
    attributes: dict[str, str]
    data: bytes
    #: Bytes of data, ordering key and attributes, counting the reserved ones as ``reserve``.
    size: int


_new_tuple = tuple.__new__


def _too_big(event_type: Any, size: int) -> NoReturn:
    raise ValidationError(
        f"event {event_type!r} would make a {size:,}-byte message; Pub/Sub accepts at most "
        f"{MAX_MESSAGE_BYTES:,} bytes of data and attributes: store the body elsewhere "
        "and publish a reference to it"
    )


def check_event(
    event_type: Any,
    payload: Any,
    topic: Any,
    key: Any,
    attributes: Any,
    reserve: int = RESERVED_OVERHEAD,
    added: int = RESERVED_COUNT,
    cloudevents: bool = True,
) -> CheckedEvent:
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
        _too_big(event_type, size)
    # What CheckedEvent(...) does, minus its Python-level __new__ (the relay checks every event).
    return _new_tuple(CheckedEvent, (event_type, topic, key, attrs, data, size))


def check_event_in_full(
    event_type: Any,
    payload: Any,
    topic: Any,
    key: Any,
    attributes: Any,
    reserve: int = RESERVED_OVERHEAD,
    added: int = RESERVED_COUNT,
    cloudevents: bool = True,
) -> CheckedEvent:
    """:func:`check_event` without its inline paths: every rule, in the same order."""
    type_bytes = _check_type(event_type)
    topic = check_topic(topic)
    key, key_bytes = _check_key(key)
    attrs, attrs_bytes = _check_attributes(attributes, added, cloudevents)
    data = encode_payload(payload)
    size = len(data) + key_bytes + attrs_bytes + reserve + type_bytes
    if size > MAX_MESSAGE_BYTES:
        _too_big(event_type, size)
    return CheckedEvent(event_type, topic, key, attrs, data, size)
