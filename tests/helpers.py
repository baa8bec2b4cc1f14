"""Test helpers: polling, Pub/Sub subscriptions that collect, a relay in a thread."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument
from google.cloud import pubsub_v1

from mongo_outbox.cli import main
from mongo_outbox.relay import Relay


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """Run ``main`` as the console script would (a return value or SystemExit is the code);
    return the code and what it printed."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class Subscription:
    """An ordered subscription on the emulator that collects what arrives."""

    client: pubsub_v1.SubscriberClient
    path: str
    received: list[Any] = field(default_factory=list)

    def pull_until(self, count: int, timeout: float = 60.0) -> list[Any]:
        """Pull (and ack) until ``count`` messages have arrived in all; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.received)} of {count} messages arrived in {timeout}s"
                )
            self.pull_once()
        return self.received

    def pull_once(self, timeout: float = 2.0) -> list[Any]:
        """One pull; returns the new messages (acked)."""
        try:
            response = self.client.pull(
                request={"subscription": self.path, "max_messages": 1000}, timeout=timeout
            )
        except Exception:
            return []
        new = [m.message for m in response.received_messages]
        if response.received_messages:
            self.client.acknowledge(
                request={
                    "subscription": self.path,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
        self.received.extend(new)
        return new

    def drain_quietly(self, quiet: float = 1.5) -> list[Any]:
        """Pull until nothing arrives for ``quiet`` seconds (to count duplicates)."""
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if self.pull_once(timeout=0.5):
                last = time.monotonic()
        return self.received


@dataclass
class PubSubKit:
    project: str
    publisher_client: pubsub_v1.PublisherClient
    subscriber_client: pubsub_v1.SubscriberClient

    def topic(self, name: str | None = None) -> tuple[str, Subscription]:
        """Create a topic and an ordered subscription to it; return (topic id, subscription)."""
        name = name or f"t-{uuid.uuid4().hex[:8]}"
        topic_path = self.publisher_client.topic_path(self.project, name)
        self.publisher_client.create_topic(name=topic_path)
        sub_path = self.subscriber_client.subscription_path(self.project, f"{name}-sub")
        self.subscriber_client.create_subscription(
            request={"name": sub_path, "topic": topic_path, "enable_message_ordering": True}
        )
        return name, Subscription(self.subscriber_client, sub_path)

    def topic_subscription(self, name: str) -> tuple[str, Subscription]:
        """A new ordered subscription to an existing topic."""
        topic_path = self.publisher_client.topic_path(self.project, name)
        sub_path = self.subscriber_client.subscription_path(
            self.project, f"{name}-sub-{uuid.uuid4().hex[:6]}"
        )
        self.subscriber_client.create_subscription(
            request={"name": sub_path, "topic": topic_path, "enable_message_ordering": True}
        )
        return name, Subscription(self.subscriber_client, sub_path)


class RelayThread:
    """A relay running in a background thread."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.relay.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def start(self) -> RelayThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "relay did not stop"
        if self.error is not None:
            raise self.error


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def invalid_utf8(doc: dict[str, Any], placeholder: str = "PLACEHOLDER") -> RawBSONDocument:
    """``doc`` as raw BSON with every ``placeholder`` (inside a str value) turned into bytes
    that are not UTF-8, as another driver or a hand-written insert can store them."""
    data = bson.encode(doc)
    needle = placeholder.encode()
    assert needle in data
    return RawBSONDocument(data.replace(needle, b"\xff" * len(needle)))
