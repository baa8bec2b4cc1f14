"""The relay's publisher, composed by wrapping: fenced by the lease, timed for the metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .._errors import PublishError
from .._message import Message
from ..publishers import Publisher
from ._lease import Lease

__all__ = ["FencedPublisher", "timed"]


class FencedPublisher:
    """Publishes only while ``lease`` is ours: each call is preceded by a check of its fence on
    the server (a lease taken over after a pause publishes nothing more) and never outlives it."""

    def __init__(self, inner: Publisher, lease: Lease) -> None:
        self._inner = inner
        self._lease = lease

    def publish(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[PublishError | None]:
        """Publish ``messages`` within what is left of the lease (raises LeaseLostError)."""
        self._lease.confirm()
        remaining = self._lease.remaining()
        return self._inner.publish(
            messages, timeout=remaining if timeout is None else min(timeout, remaining)
        )

    def close(self) -> None:
        """Close the publisher inside."""
        self._inner.close()


class _TimedPublisher:
    """Observes the seconds each publish call takes."""

    def __init__(self, inner: Publisher, observe: Callable[[float], None]) -> None:
        self._inner = inner
        self._observe = observe

    def publish(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[PublishError | None]:
        """Publish ``messages``, timed."""
        started = time.perf_counter()
        try:
            return self._inner.publish(messages, timeout=timeout)
        finally:
            self._observe(time.perf_counter() - started)

    def close(self) -> None:
        """Close the publisher inside."""
        self._inner.close()


def timed(publisher: Publisher, observe: Callable[[float], None]) -> Publisher:
    """``publisher`` with the seconds of each Publish request observed: a publisher that reports
    its requests (``on_request``, as Pub/Sub's does, a call being one request per topic and
    chunk) is handed ``observe``; any other is wrapped and timed per call."""
    if hasattr(publisher, "on_request"):
        publisher.on_request = observe
        return publisher
    return _TimedPublisher(publisher, observe)
