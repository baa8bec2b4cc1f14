"""The outbox document's one home: its statuses, how ``emit`` builds it, how the relay and
replay decode it.

The relay reads documents as raw BSON and decodes each one on its own, so a document that
cannot be decoded (invalid UTF-8 written by another driver, a date out of range...) is set
aside with its reason instead of failing the batch, the stream or the sweep that carried it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import bson
from bson import ObjectId
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from bson.tz_util import utc as _BSON_UTC

from ._errors import PoisonEventError
from ._formats import JSON, OUTBOX, TEXT, MessageFormat
from ._limits import check_event
from ._message import Message, message_from_document
from ._partition import slot_for
from ._times import utc_second, utcnow

__all__ = [
    "STATUS_DEAD",
    "STATUS_PENDING",
    "STATUS_PUBLISHED",
    "Event",
    "Poison",
    "attempts_of",
    "build_document",
    "decode_batch",
    "decode_document",
    "event_from_raw",
    "key_of",
    "lane_of",
    "to_event",
]

STATUS_PENDING = "pending"
STATUS_PUBLISHED = "published"
STATUS_DEAD = "dead"


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
    event = check_event(event_type, payload, topic, key, attributes)
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


def attempts_of(doc: Mapping[str, Any]) -> int:
    """The ``attempts`` counter of a document, tolerating a missing or odd value."""
    value = doc.get("attempts", 0)
    if isinstance(value, (int, Int64)) and not isinstance(value, bool):
        return int(value)
    return 0


def key_of(doc: Mapping[str, Any]) -> str | None:
    """The ordering key of an outbox document (None when absent or malformed)."""
    key = doc.get("key")
    return key if isinstance(key, str) and key else None


def lane_of(doc: Mapping[str, Any], default_topic: str | None) -> str | None:
    """The ordering lane of a document: its key on its topic (None without a key)."""
    key = key_of(doc)
    if key is None:
        return None
    topic = doc.get("topic")
    return f"{topic if isinstance(topic, str) else default_topic or ''}\n{key}"


_STRICT: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_LENIENT: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
    unicode_decode_error_handler="replace",
)


# Not frozen: a frozen dataclass costs a microsecond more to build, and the relay builds one
# per event. Nothing changes an Event once built.
@dataclass(slots=True)
class Event:
    """A pending outbox event ready to publish, its topic resolved."""

    message: Message
    attempts: int
    #: Bytes the event takes as BSON: what memory budgets count.
    size: int
    #: ``created_at`` as seconds since the epoch (0: unknown), for the lag metric.
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class Poison:
    """An outbox document that can never be published, with the reason it is set aside."""

    event_id: Any  # the document's ``_id``, whatever its type (None: not even that decodes)
    attempts: int
    reason: str
    size: int
    #: Its ordering slot when it can be told: under the "hold" policy it holds later events.
    slot: str | None = None


def decode_document(
    raw: RawBSONDocument | Mapping[str, Any], default_topic: str | None = None
) -> dict[str, Any] | Poison:
    """Decode one raw outbox document, or return it as :class:`Poison` naming the problem."""
    if not isinstance(raw, RawBSONDocument):
        return dict(raw)
    data = raw.raw
    try:
        return bson.decode(data, _STRICT)
    except Exception as exc:  # bson raises InvalidBSON, but also UnicodeError, OverflowError...
        reason = f"cannot decode the document: {type(exc).__name__}: {exc}"
        try:
            doc = bson.decode(data, _LENIENT)
        except Exception:
            return Poison(None, 0, reason, len(data))
        return Poison(
            doc.get("_id"), attempts_of(doc), reason, len(data), lane_of(doc, default_topic)
        )


def decode_batch(
    raws: list[RawBSONDocument], default_topic: str | None = None
) -> list[dict[str, Any] | Poison]:
    """Decode raw outbox documents in one call; one by one (poison named) if any fails."""
    try:
        docs: list[dict[str, Any] | Poison] = list(
            bson.decode_all(b"".join([raw.raw for raw in raws]), _STRICT)
        )
    except Exception:
        return [decode_document(raw, default_topic) for raw in raws]
    return docs


def to_event(
    doc: dict[str, Any] | Poison,
    default_topic: str | None,
    size: int = 0,
    fmt: MessageFormat = OUTBOX,
) -> Event | Poison:
    """Turn a decoded outbox document into an :class:`Event` in format ``fmt``, its topic
    resolved."""
    if isinstance(doc, Poison):
        return doc
    try:
        message = message_from_document(doc, default_topic, fmt)
    except PoisonEventError as exc:
        slot = lane_of(doc, default_topic)
        return Poison(doc.get("_id"), attempts_of(doc), f"poison: {exc}", size, slot)
    if message.topic is None:
        return Poison(
            message.event_id,
            attempts_of(doc),
            "event has no topic and the relay has no default topic (--default-topic): "
            "requeue it once one is set",
            size,
        )
    attempts = doc.get("attempts", 0)
    if type(attempts) is not int:
        attempts = attempts_of(doc)
    return Event(message, attempts, size or message.size, _seconds(doc.get("created_at")))


def _seconds(created: Any) -> float:
    """``created.timestamp()`` of an aware datetime (0.0: unknown), UTC ones from a cache."""
    if not isinstance(created, _dt.datetime):
        return 0.0
    tz = created.tzinfo
    if tz is None:
        return 0.0
    if tz is _BSON_UTC or tz is _dt.timezone.utc:
        # The same float as timestamp(): whole microseconds over 10**6, correctly rounded.
        return (utc_second(created)[1] * 1_000_000 + created.microsecond) / 1_000_000
    return created.timestamp()


def event_from_raw(
    raw: RawBSONDocument, default_topic: str | None, fmt: MessageFormat = OUTBOX
) -> Event | Poison:
    """Decode a raw outbox document and turn it into an :class:`Event` (or poison)."""
    return to_event(decode_document(raw, default_topic), default_topic, len(raw.raw), fmt)
