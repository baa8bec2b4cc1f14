"""Google Cloud Pub/Sub publisher on the generated (GAPIC) client.

The relay already holds whole batches in order, so it sends each topic's messages as prepared
``Publish`` requests rather than going through the high-level client's per-message futures
and batching threads. Ordering is kept by sending a topic's requests one after another and by
leaving out the later messages of a key whose request failed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.pubsub_v1 import PublisherClient, PublishRequest

from .._errors import (
    ConfigurationError,
    NotSentError,
    PermanentPublishError,
    PublishError,
    TransientPublishError,
)
from .._message import Message
from .._tracing import PublishTracing

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["PubSubPublisher"]

# Plain protobuf classes: building messages through proto-plus wrappers costs ~4x more.
_PB_REQUEST: Any = PublishRequest.pb()
_MAX_REQUEST_MESSAGES = 1000
# The Publish request limit is 10 MB; leave room for the per-message framing.
_MAX_REQUEST_BYTES = 9_000_000
_TRANSIENT = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.ResourceExhausted,
    gexc.Aborted,
    gexc.InternalServerError,
    gexc.Unknown,
    gexc.Cancelled,
    gexc.RetryError,
    gexc.TooManyRequests,
)


def map_google_error(exc: BaseException, topic: str) -> PublishError:
    """Turn a Google API error into a transient or permanent :class:`PublishError`."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (_TRANSIENT, TimeoutError, ConnectionError)):
        error: PublishError = TransientPublishError(f"publish to {topic} failed: {text}")
    elif isinstance(exc, gexc.NotFound):
        error = PermanentPublishError(
            f"topic {topic} does not exist: create it, or pass --create-topics"
        )
    else:
        error = PermanentPublishError(f"publish to {topic} refused: {text}")
    error.__cause__ = exc
    return error


def make_gapic_client() -> PublisherClient:
    """A generated Publisher client that honours ``PUBSUB_EMULATOR_HOST`` as Google's does."""
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if host:
        credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
        return PublisherClient(credentials=credentials, client_options={"api_endpoint": host})
    return PublisherClient()


class PubSubPublisher:
    """Publishes to Google Cloud Pub/Sub topics of ``project``.

    A message's topic may be an id (resolved in ``project``) or a full
    ``projects/<p>/topics/<id>`` path. With ``create_topics`` a missing topic is created on
    first use. ``timeout`` bounds each Publish request in seconds; retries are the relay's.
    With OpenTelemetry configured (``tracer_provider``, else the global provider), each request
    is a PRODUCER span linked to its events' trace contexts.
    """

    def __init__(
        self,
        project: str,
        *,
        create_topics: bool = False,
        timeout: float = 10.0,
        client: PublisherClient | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        if not project:
            raise ConfigurationError("a Google Cloud project is required (--project)")
        self.project = project
        self._create_topics = create_topics
        self._timeout = timeout
        self._client = client or make_gapic_client()
        self._known_topics: set[str] = set()
        self._tracing = PublishTracing(tracer_provider)
        #: Called with the seconds each Publish request took (the relay's metrics set it).
        self.on_request: Callable[[float], None] | None = None

    def topic_path(self, topic: str) -> str:
        """The full resource path of ``topic``."""
        if topic.startswith("projects/"):
            return topic
        return f"projects/{self.project}/topics/{topic}"

    def ensure_topic(self, topic: str) -> None:
        """Create ``topic`` unless it exists."""
        path = self.topic_path(topic)
        with contextlib.suppress(gexc.AlreadyExists):
            self._client.create_topic(name=path, timeout=self._timeout)
        self._known_topics.add(path)

    def publish(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[PublishError | None]:
        """Publish ``messages``, one request per topic and chunk, in order.

        Each request waits at most ``timeout`` (the constructor's), and all of them together
        at most the ``timeout`` given here.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[PublishError | None] = [None] * len(messages)
        by_topic: dict[str, list[int]] = {}
        paths: dict[str, list[int]] = {}  # topic as the message names it -> its path's indexes
        for i, message in enumerate(messages):
            topic = message.topic
            if not topic:
                results[i] = PermanentPublishError("message has no topic")
                continue
            indexes = paths.get(topic)
            if indexes is None:
                indexes = paths[topic] = by_topic.setdefault(self.topic_path(topic), [])
            indexes.append(i)
        for path, indexes in by_topic.items():
            self._publish_topic(path, messages, indexes, results, deadline)
        return results

    def _publish_topic(
        self,
        path: str,
        messages: Sequence[Message],
        indexes: list[int],
        results: list[PublishError | None],
        deadline: float | None,
    ) -> None:
        if self._create_topics and path not in self._known_topics:
            try:
                self.ensure_topic(path)
            except gexc.PermissionDenied:
                # Allowed to publish but not to create: the topic may well exist; try it.
                self._known_topics.add(path)
            except gexc.GoogleAPICallError as exc:
                error = map_google_error(exc, path)
                for i in indexes:
                    results[i] = error
                return
        failed_keys: dict[str, PublishError] = {}
        for chunk in _chunks(messages, indexes):
            self._send_chunk(path, messages, chunk, results, failed_keys, deadline)

    def _send_chunk(
        self,
        path: str,
        messages: Sequence[Message],
        chunk: list[int],
        results: list[PublishError | None],
        failed_keys: dict[str, PublishError],
        deadline: float | None,
    ) -> None:
        """Send one request; if the broker refuses it, split it so that only the message at
        fault is charged, never its neighbours."""
        if failed_keys:
            sendable = []
            for i in chunk:
                key = messages[i].ordering_key
                if key is not None and key in failed_keys:
                    results[i] = NotSentError(f"held behind an earlier failed event of key {key!r}")
                else:
                    sendable.append(i)
        else:
            sendable = chunk
        if not sendable:
            return
        error = self._send(path, [messages[i] for i in sendable], deadline)
        if error is None:
            return
        if len(sendable) > 1 and isinstance(error.__cause__, gexc.BadRequest):
            middle = len(sendable) // 2
            self._send_chunk(path, messages, sendable[:middle], results, failed_keys, deadline)
            self._send_chunk(path, messages, sendable[middle:], results, failed_keys, deadline)
            return
        for i in sendable:
            results[i] = error
            key = messages[i].ordering_key
            if key is not None:
                failed_keys.setdefault(key, error)

    def _send(self, path: str, batch: list[Message], deadline: float | None) -> PublishError | None:
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                return NotSentError(
                    f"publish to {path} not sent: no time left in the relay's lease"
                )
        # Messages are added in place (built apart, each would be copied into the request) and
        # their attributes set one by one (the map's update() is a slow generic Python loop).
        request = _PB_REQUEST(topic=path)
        add = request.messages.add
        for m in batch:
            attributes = add(data=m.data, ordering_key=m.ordering_key or "").attributes
            for name, value in m.attributes.items():
                attributes[name] = value

        def send() -> PublishError | None:
            started = time.perf_counter()
            try:
                self._client.publish(
                    request=PublishRequest.wrap(request), retry=None, timeout=timeout
                )
            except Exception as exc:
                return map_google_error(exc, path)
            finally:
                if self.on_request is not None:
                    self.on_request(time.perf_counter() - started)
            return None

        return self._tracing.publish(path, batch, send)

    def close(self) -> None:
        """Close the gRPC channel."""
        transport: Any = getattr(self._client, "transport", None)
        if transport is not None:
            transport.close()


def _measure(m: Message) -> int:
    size = len(m.data) + len((m.ordering_key or "").encode())
    return size + sum(len(k.encode()) + len(v.encode()) for k, v in m.attributes.items())


def _chunks(messages: Sequence[Message], indexes: list[int]) -> list[list[int]]:
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in indexes:
        m = messages[i]
        msg_size = (m.size or _measure(m)) + 8 * len(m.attributes) + 64  # + protobuf framing
        if current and (
            len(current) >= _MAX_REQUEST_MESSAGES or size + msg_size > _MAX_REQUEST_BYTES
        ):
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += msg_size
    if current:
        chunks.append(current)
    return chunks
