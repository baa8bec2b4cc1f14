"""An in-memory publisher for tests and the demo."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from .._errors import NotSentError, PermanentPublishError, PublishError, TransientPublishError
from .._message import Message

__all__ = ["InMemoryPublisher"]


class InMemoryPublisher:
    """Keeps published messages in a list; can be told to fail topics.

    ``fail_topics`` maps a topic to an error factory; messages for it fail with that error.
    ``on_publish`` is called with each confirmed message (the demo prints them).
    """

    def __init__(self, on_publish: Callable[[Message], None] | None = None) -> None:
        self.messages: list[Message] = []
        self.fail_topics: dict[str, Callable[[], PublishError]] = {}
        self.closed = False
        #: How many times :meth:`publish` was called.
        self.calls = 0
        self._on_publish = on_publish
        self._lock = threading.Lock()

    def fail_topic(self, topic: str, *, transient: bool = False) -> None:
        """Make every publish to ``topic`` fail until :meth:`heal_topic`."""
        kind = TransientPublishError if transient else PermanentPublishError
        self.fail_topics[topic] = lambda: kind(f"topic {topic} refused (in-memory failure)")

    def heal_topic(self, topic: str) -> None:
        """Let publishes to ``topic`` succeed again."""
        self.fail_topics.pop(topic, None)

    def publish(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[PublishError | None]:
        """Record the messages; a failed key stops its later messages on that topic."""
        results: list[PublishError | None] = []
        failed_keys: dict[tuple[str | None, str], PublishError] = {}
        with self._lock:
            self.calls += 1
            for message in messages:
                key = None
                if message.ordering_key is not None:
                    key = (message.topic, message.ordering_key)
                if key is not None and key in failed_keys:
                    results.append(NotSentError(f"ordering key {message.ordering_key!r} paused"))
                    continue
                factory = self.fail_topics.get(message.topic or "")
                if factory is not None:
                    error = factory()
                    if key is not None:
                        failed_keys[key] = error
                    results.append(error)
                    continue
                self.messages.append(message)
                if self._on_publish is not None:
                    self._on_publish(message)
                results.append(None)
        return results

    def close(self) -> None:
        """Mark the publisher closed."""
        self.closed = True
