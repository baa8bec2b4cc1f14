"""The message the relay publishes, made from an outbox document in a message format."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
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
    MessageFormat,
)
from ._limits import CheckedEvent, check_event
from ._times import format_timestamp, utc_second
from ._trace_context import add_trace_attributes

__all__ = ["Message", "message_from_document", "message_lane"]


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
        add_trace_attributes(trace_attributes, trace)
        reserve = fmt.overhead + sum(len(k) + len(v) for k, v in trace_attributes.items())
    try:
        event = check_event(
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
    fmt: MessageFormat, doc: Mapping[str, Any], event: CheckedEvent, event_id: str, created: str
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


def message_lane(message: Message) -> str | None:
    """The ordering lane of a message whose topic is resolved: its key on its topic (None
    without a key). Pub/Sub orders per lane, so that is the unit that waits."""
    if message.ordering_key is None:
        return None
    return f"{message.topic or ''}\n{message.ordering_key}"
