"""A topic and an ordered subscription on the emulator, for testing a consumer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from .._formats import ATTR_EVENT_ID, ATTR_EVENT_TYPE

if TYPE_CHECKING:
    from .._inbox import Inbox

__all__ = ["EmulatorSubscription", "subscribe_until"]


class EmulatorSubscription:
    """A fresh topic of ``project`` with one subscription (message ordering on), on the
    emulator that ``PUBSUB_EMULATOR_HOST`` names.

    :meth:`publish` sends a message as the relay would (with ``outbox_event_id``);
    :meth:`deliver_twice` sends the same event twice, as a relay does after a crash, so a test
    can check that its consumer's effect happens once.
    """

    def __init__(
        self,
        project: str,
        name: str | None = None,
        *,
        ordered: bool = True,
        exactly_once: bool = False,
    ) -> None:
        from google.cloud import pubsub_v1

        name = name or f"t-{uuid.uuid4().hex[:10]}"
        self.publisher = pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
        )
        self.subscriber = pubsub_v1.SubscriberClient()
        #: The topic id and its path.
        self.topic = name
        self.topic_path = self.publisher.topic_path(project, name)
        #: ``projects/<project>/subscriptions/<name>-sub``: what ``Inbox.subscribe`` takes.
        self.path = self.subscriber.subscription_path(project, f"{name}-sub")
        self.publisher.create_topic(name=self.topic_path)
        self.subscriber.create_subscription(
            request={
                "name": self.path,
                "topic": self.topic_path,
                "enable_message_ordering": ordered,
                "enable_exactly_once_delivery": exactly_once,
                "ack_deadline_seconds": 10,
            }
        )

    def publish(
        self,
        data: bytes = b"{}",
        *,
        event_id: str | None = None,
        event_type: str = "TestEvent",
        key: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> str:
        """Publish one message carrying ``outbox_event_id`` (a new id unless given); return
        the event id."""
        event_id = event_id or str(ObjectId())
        attrs = {**(attributes or {}), ATTR_EVENT_ID: event_id, ATTR_EVENT_TYPE: event_type}
        self.publisher.publish(self.topic_path, data, ordering_key=key or "", **attrs).result(
            timeout=30
        )
        return event_id

    def deliver_twice(self, data: bytes = b"{}", **options: Any) -> str:
        """Publish the same event (same ``outbox_event_id``) twice; return its id."""
        event_id = self.publish(data, **options)
        self.publish(data, **{**options, "event_id": event_id})
        return event_id

    def close(self) -> None:
        """Delete the subscription and the topic and close the clients."""
        try:
            self.subscriber.delete_subscription(request={"subscription": self.path})
            self.publisher.delete_topic(request={"topic": self.topic_path})
        finally:
            self.subscriber.close()
            self.publisher.stop()


def subscribe_until(
    inbox: Inbox,
    subscription: str,
    handler: Callable[[Any, Any], Any],
    until: Callable[[], bool],
    *,
    timeout: float = 30.0,
    **options: Any,
) -> None:
    """Run ``inbox.subscribe(subscription, handler)`` until ``until()`` is true, then stop it
    (it finishes the messages in hand); raise AssertionError after ``timeout`` seconds, or
    what ended the subscriber."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            inbox.subscribe(subscription, handler, stop=stop, **options)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="outbox-test-subscriber", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not until():
            if failure:
                raise failure[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s of subscribing")
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(60)
    if failure:
        raise failure[0]
