"""The tiny interface the relay publishes through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .._errors import PublishError
from .._message import Message

__all__ = ["Publisher"]


@runtime_checkable
class Publisher(Protocol):
    """Publishes batches of messages and reports each one's fate.

    ``publish`` returns one entry per message, in order: ``None`` when the broker confirmed it,
    else the :class:`~mongo_outbox.PublishError` (transient or permanent) that stopped it.
    Messages sharing an ordering key must reach the broker in the order given; once one of
    them fails, the later ones of that key must not be sent (report them with
    :class:`~mongo_outbox.NotSentError`, which counts nothing against their topic).
    Every message has a topic (the relay applies its default before calling).
    """

    def publish(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[PublishError | None]:
        """Publish ``messages`` and wait until each is confirmed or has failed.

        ``timeout`` (seconds) bounds the whole call: the relay passes what is left of its
        lease. Messages not confirmed in time are reported with a transient error.
        """
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...
