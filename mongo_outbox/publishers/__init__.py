"""Publishers: where the relay sends messages. Pub/Sub is one; an in-memory one serves tests."""

from ._base import Publisher
from ._memory import InMemoryPublisher
from ._pubsub import PubSubPublisher

__all__ = ["InMemoryPublisher", "PubSubPublisher", "Publisher"]
