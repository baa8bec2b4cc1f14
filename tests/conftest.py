"""Shared fixtures: Pub/Sub topics with ordered subscriptions, and a relay in a thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.cloud import pubsub_v1
from helpers import PubSubKit, RelayThread
from pymongo import MongoClient

from mongo_outbox import ensure_indexes
from mongo_outbox.publishers import Publisher, PubSubPublisher
from mongo_outbox.relay import Relay, RelayConfig


@pytest.fixture
def pubsub(pubsub_emulator_host: str, pubsub_project: str) -> Iterator[PubSubKit]:
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    yield PubSubKit(pubsub_project, publisher, subscriber)
    subscriber.close()


@pytest.fixture
def client(mongodb_uri: str) -> Iterator[MongoClient[Any]]:
    c: MongoClient[Any] = MongoClient(mongodb_uri, tz_aware=True)
    yield c
    c.close()


@pytest.fixture
def db_name(client: MongoClient[Any], outbox_database: str) -> str:
    ensure_indexes(client, outbox_database)
    return outbox_database


@pytest.fixture
def relay_factory(
    client: MongoClient[Any], pubsub: PubSubKit
) -> Iterator[Callable[..., RelayThread]]:
    started: list[RelayThread] = []
    publishers: list[Publisher] = []

    def make(
        database: str,
        *,
        publisher: Publisher | None = None,
        start: bool = True,
        **config: Any,
    ) -> RelayThread:
        if publisher is None:
            publisher = PubSubPublisher(pubsub.project)
            publishers.append(publisher)
        config.setdefault("sweep_interval", 1.0)
        config.setdefault("sweep_grace", 0.5)
        relay = Relay(client, publisher, RelayConfig(database=database, **config))
        runner = RelayThread(relay)
        if start:
            runner.start()
            started.append(runner)
        return runner

    yield make
    for runner in started:
        if runner.thread.is_alive():
            runner.stop_event.set()
            runner.thread.join(timeout=60)
    for p in publishers:
        p.close()
