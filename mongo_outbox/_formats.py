"""Message formats: the attributes the relay (and ``replay``) put on a published event.

``outbox`` (the default) adds ``outbox_event_id``, ``outbox_event_type`` and
``outbox_created_at``. ``cloudevents`` follows the CloudEvents Pub/Sub protocol binding in
binary mode: ``ce-specversion``, ``ce-id``, ``ce-type``, ``ce-source``, ``ce-time`` and, when the
payload's media type is known, ``content-type``; ``outbox_event_id`` stays so consumers
de-duplicate the same way in both formats. Both keep the user's attributes and the trace
context; ``replay`` adds ``outbox_replay=1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote

from ._errors import ConfigurationError

__all__ = [
    "ATTR_REPLAY",
    "CE_ATTRIBUTES",
    "FORMATS",
    "MessageFormat",
    "default_source",
    "message_format",
]

FORMATS = ("outbox", "cloudevents")

ATTR_EVENT_ID = "outbox_event_id"
ATTR_EVENT_TYPE = "outbox_event_type"
ATTR_CREATED_AT = "outbox_created_at"
ATTR_REPLAY = "outbox_replay"
CE_SPECVERSION = "ce-specversion"
CE_ID = "ce-id"
CE_TYPE = "ce-type"
CE_SOURCE = "ce-source"
CE_TIME = "ce-time"
CONTENT_TYPE = "content-type"
#: Every attribute the cloudevents format adds (``outbox_event_id`` aside).
CE_ATTRIBUTES = (CE_SPECVERSION, CE_ID, CE_TYPE, CE_SOURCE, CE_TIME, CONTENT_TYPE)
#: Media types ``emit`` stores for the payloads it encodes (none for bytes: unknown).
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
MAX_CONTENT_TYPE_BYTES = len(TEXT)
#: Longest ``ce-source``: an attribute value.
MAX_SOURCE_BYTES = 1024
# The characters of an RFC 3986 URI-reference (unreserved, reserved, and %XX escapes).
_SOURCE_RE = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")


def default_source(database: str, collection: str) -> str:
    """``mongo-outbox://<database>/<collection>``, percent-encoded where a name needs it."""
    return f"mongo-outbox://{quote(database, safe='')}/{quote(collection, safe='')}"


def check_source(source: str) -> str:
    """Return ``source`` if it can be a ``ce-source`` (a non-empty URI-reference)."""
    if not source or not _SOURCE_RE.fullmatch(source):
        raise ConfigurationError(
            f"--cloudevents-source {source!r} is not a URI-reference: use RFC 3986 characters "
            "(others escaped as %XX), e.g. //shop.example.com/orders or urn:shop"
        )
    if len(source) > MAX_SOURCE_BYTES:
        raise ConfigurationError(
            f"--cloudevents-source is {len(source)} bytes; a Pub/Sub attribute value holds at "
            f"most {MAX_SOURCE_BYTES}"
        )
    return source


@dataclass(frozen=True, slots=True)
class MessageFormat:
    """How outbox documents become messages: ``cloudevents_source`` set means CloudEvents."""

    cloudevents_source: str | None = None
    #: Mark every message ``outbox_replay=1`` (``mongo-outbox replay``).
    replay: bool = False
    #: Attributes this format adds besides the user's and the trace context, and their bytes
    #: (names and values) apart from the event type's, which is per event.
    added: int = field(init=False)
    overhead: int = field(init=False)

    def __post_init__(self) -> None:
        if self.cloudevents_source is None:
            added = 3
            overhead = len(ATTR_EVENT_ID + ATTR_EVENT_TYPE + ATTR_CREATED_AT) + 24 + 24
        else:
            check_source(self.cloudevents_source)
            added = len(CE_ATTRIBUTES) + 1
            overhead = (
                sum(len(n) for n in CE_ATTRIBUTES)
                + len(ATTR_EVENT_ID)
                + 3  # "1.0"
                + 24 * 3  # ce-id, outbox_event_id, ce-time
                + len(self.cloudevents_source)
                + MAX_CONTENT_TYPE_BYTES
            )
        if self.replay:
            added += 1
            overhead += len(ATTR_REPLAY) + 1
        object.__setattr__(self, "added", added)
        object.__setattr__(self, "overhead", overhead)


OUTBOX = MessageFormat()


def message_format(
    name: str, cloudevents_source: str | None, database: str, collection: str
) -> MessageFormat:
    """The format ``--message-format name`` (and ``--cloudevents-source``) select, checked."""
    if name not in FORMATS:
        raise ConfigurationError(
            f"message format {name!r} is unknown: use 'outbox' or 'cloudevents'"
        )
    if cloudevents_source is not None and name != "cloudevents":
        raise ConfigurationError(
            "--cloudevents-source applies only to --message-format cloudevents"
        )
    if name == "outbox":
        return OUTBOX
    if cloudevents_source is None:
        return MessageFormat(default_source(database, collection))
    return MessageFormat(check_source(cloudevents_source))


#: What ``emit`` reserves room for: the larger format, replayed, with the longest source.
WIDEST = MessageFormat("x" * MAX_SOURCE_BYTES, replay=True)
