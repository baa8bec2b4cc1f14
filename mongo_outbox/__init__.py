"""mongo-outbox: the transactional outbox pattern for MongoDB, relayed to Google Cloud Pub/Sub.

Write domain documents and events in one transaction with :func:`outbox_transaction`; run
``mongo-outbox relay`` to publish the events at least once, in order per key; consume them
with an :class:`Inbox` so each event's effect happens once.
"""

from ._errors import (
    ConfigurationError,
    ConnectError,
    LeaseLostError,
    NotSentError,
    OutboxError,
    PermanentPublishError,
    PoisonEventError,
    PublishError,
    TransientPublishError,
    ValidationError,
)
from ._inbox import Inbox
from ._message import Message
from ._payload import encode_payload
from ._store import ensure_indexes
from ._transaction import (
    AsyncOutboxTransaction,
    OutboxTransaction,
    emit_in,
    outbox_transaction,
    run_in_outbox_transaction,
)
from .publishers import InMemoryPublisher, Publisher, PubSubPublisher
from .relay import Relay, RelayConfig, RelayStats

__version__ = "0.1.0"

__all__ = [
    "AsyncOutboxTransaction",
    "ConfigurationError",
    "ConnectError",
    "InMemoryPublisher",
    "Inbox",
    "LeaseLostError",
    "Message",
    "NotSentError",
    "OutboxError",
    "OutboxTransaction",
    "PermanentPublishError",
    "PoisonEventError",
    "PubSubPublisher",
    "PublishError",
    "Publisher",
    "Relay",
    "RelayConfig",
    "RelayStats",
    "TransientPublishError",
    "ValidationError",
    "__version__",
    "emit_in",
    "encode_payload",
    "ensure_indexes",
    "outbox_transaction",
    "run_in_outbox_transaction",
]
