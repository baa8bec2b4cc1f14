"""The exception tree of mongo-outbox.

Every error the library raises derives from :class:`OutboxError`; driver and Google errors are
mapped at the boundary with ``raise ... from exc`` so the cause stays visible.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConnectError",
    "LeaseLostError",
    "OutboxError",
    "PermanentPublishError",
    "PoisonEventError",
    "PublishError",
    "TransientPublishError",
    "ValidationError",
]


#: How to turn a standalone mongod into the replica set the outbox needs (error messages).
REPLICA_SET_FIX = (
    "the outbox needs transactions and change streams, which need a replica set: start mongod "
    "with --replSet rs0 and run rs.initiate() (a single node is enough)"
)


class OutboxError(Exception):
    """Base class of every mongo-outbox error."""


class ConfigurationError(OutboxError, ValueError):
    """The library or relay is configured wrongly (bad flag or setting, standalone server...).

    A :class:`ValueError` too, as bad settings were before this type existed.
    """


class ConnectError(OutboxError):
    """A service (MongoDB, Pub/Sub) cannot be reached."""


class ValidationError(OutboxError, ValueError):
    """An event breaks a rule (payload type, Pub/Sub limits); raised by ``emit`` before commit."""


class PoisonEventError(ValidationError):
    """An outbox document cannot be turned into a message (missing or wrong fields)."""


class PublishError(OutboxError):
    """Publishing a message failed."""


class TransientPublishError(PublishError):
    """A publish failure that may succeed on retry (unavailable, deadline, quota)."""


class NotSentError(TransientPublishError):
    """A message a publisher did not send: its key waits behind a failure, or no time was left.

    Says nothing about the broker's health, so it never counts against the message's topic.
    """


class PermanentPublishError(PublishError):
    """A publish failure that retrying as is will not fix (bad topic, refused message)."""


class LeaseLostError(OutboxError):
    """The relay no longer holds the lease of its outbox and must stop publishing."""
