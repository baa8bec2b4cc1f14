"""Publishers: where the relay sends messages. Pub/Sub is one; an in-memory one serves tests.

A publisher reports a message it did not send (its key waits behind a failure, no time was left)
with :class:`NotSentError`.
"""

from .._errors import NotSentError
from ._base import Publisher
from ._memory import InMemoryPublisher
from ._pubsub import PubSubPublisher

__all__ = ["InMemoryPublisher", "NotSentError", "PubSubPublisher", "Publisher"]
