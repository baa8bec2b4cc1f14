"""``mongo-outbox demo``: the whole flow on a throwaway replica set and Pub/Sub emulator."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from typing import Any

from pymongo import MongoClient

from ._admin import OutboxAdmin
from ._message import Message
from ._store import ensure_indexes
from ._transaction import outbox_transaction
from .publishers import InMemoryPublisher, Publisher, PubSubPublisher
from .relay import Relay, RelayConfig
from .testing import MongoReplicaSet, PubSubEmulator, ServiceUnavailable, find_pubsub_emulator

__all__ = ["run_demo"]

PROJECT = "mongo-outbox-demo"
TOPIC = "orders"
SUBSCRIPTION = "orders-demo"
ORDERS = 6


def _say(text: str) -> None:
    print(text, flush=True)


def _print_message(message: Message) -> None:
    attrs = dict(message.attributes)
    _say(
        f"  published {attrs.pop('outbox_event_type')} id={attrs.pop('outbox_event_id')} "
        f"key={message.ordering_key} data={message.data.decode()}"
    )


def run_demo() -> int:
    """Run the demo; return the exit code."""
    with contextlib.ExitStack() as stack:
        uri = os.environ.get("MONGODB_URI")
        if uri:
            _say("1. using the replica set in MONGODB_URI")
        else:
            _say("1. starting a throwaway single-node MongoDB replica set (real mongod)...")
            try:
                uri = stack.enter_context(MongoReplicaSet()).uri
            except ServiceUnavailable as exc:
                _say(f"   cannot start mongod: {exc}")
                return 2
            _say(f"   replica set ready at {uri}")
        emulator_host = os.environ.get("PUBSUB_EMULATOR_HOST")
        if not emulator_host and find_pubsub_emulator():
            _say("2. starting the Pub/Sub emulator of the Google Cloud CLI...")
            try:
                emulator_host = stack.enter_context(PubSubEmulator()).host
            except ServiceUnavailable as exc:
                _say(f"   the emulator did not start ({exc}); using an in-memory publisher")
        elif not emulator_host:
            _say(
                "2. no Pub/Sub emulator installed (Google Cloud CLI with pubsub-emulator): "
                "publishing to an in-memory publisher that prints each message"
            )
        client: MongoClient[Any] = stack.enter_context(MongoClient(uri, tz_aware=True))
        # A database of its own, dropped at the end: MONGODB_URI may point at real data.
        db = f"mongo_outbox_demo_{uuid.uuid4().hex[:8]}"
        stack.callback(client.drop_database, db)
        ensure_indexes(client, db)
        subscriber = None
        memory: InMemoryPublisher | None = None
        publisher: Publisher
        if emulator_host:
            os.environ["PUBSUB_EMULATOR_HOST"] = emulator_host
            _say(
                f"   emulator at {emulator_host}; creating topic {TOPIC!r} and an ordered "
                f"subscription {SUBSCRIPTION!r}"
            )
            pubsub = PubSubPublisher(PROJECT, create_topics=True)
            pubsub.ensure_topic(TOPIC)
            subscriber = _Subscriber(pubsub.topic_path(TOPIC))
            stack.callback(subscriber.close)
            publisher = pubsub
        else:
            publisher = memory = InMemoryPublisher(on_publish=_print_message)
        stack.callback(publisher.close)

        _say("3. starting the relay (change stream + sweep) in the background")
        relay = Relay(client, publisher, RelayConfig(database=db, default_topic=TOPIC))
        stop = threading.Event()
        thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
        thread.start()

        _say(
            f"4. writing {ORDERS} orders, each with its OrderCreated event, in one transaction "
            "per order"
        )
        for n in range(1, ORDERS + 1):
            customer = f"customer-{n % 2}"
            order = {"_id": n, "customer": customer, "total": 10 * n}
            with outbox_transaction(client, database=db) as tx:
                client[db].orders.insert_one(order, session=tx.session)
                tx.emit("OrderCreated", order, key=customer)
        _say("   and one transaction that fails: its order and event vanish together")
        try:
            with outbox_transaction(client, database=db) as tx:
                client[db].orders.insert_one({"_id": 99}, session=tx.session)
                tx.emit("OrderCreated", {"id": 99}, key="customer-1")
                raise RuntimeError("payment declined")
        except RuntimeError:
            pass

        _say("5. events arriving:")
        received: list[Any] = []
        if subscriber is not None:
            received = subscriber.pull(ORDERS, timeout=30)
            for msg in received:
                attrs = dict(msg.attributes)
                _say(
                    f"  received {attrs['outbox_event_type']} id={attrs['outbox_event_id']} "
                    f"key={msg.ordering_key} data={msg.data.decode()}"
                )
        elif memory is not None:
            deadline = time.monotonic() + 30
            while len(memory.messages) < ORDERS and time.monotonic() < deadline:
                time.sleep(0.05)
            received = list(memory.messages)
        stop.set()
        thread.join()
        counts = OutboxAdmin(client[db]).counts()
        orders = client[db].orders.count_documents({})
        _say(f"6. done: {orders} orders, outbox {counts}; relay published {relay.stats.published}")
        ok = len(received) == ORDERS and counts["pending"] == 0
        _say("   stopping everything" + ("" if ok else " (some events did not arrive!)"))
        return 0 if ok else 1
    return 1


class _Subscriber:
    """Pulls the demo's messages from an ordered subscription on the emulator."""

    def __init__(self, topic_path: str) -> None:
        from google.cloud import pubsub_v1

        self._client = pubsub_v1.SubscriberClient()
        self.path = self._client.subscription_path(PROJECT, SUBSCRIPTION)
        self._client.create_subscription(
            request={"name": self.path, "topic": topic_path, "enable_message_ordering": True}
        )

    def pull(self, count: int, timeout: float) -> list[Any]:
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            response = self._client.pull(
                request={"subscription": self.path, "max_messages": 100}, timeout=5
            )
            if not response.received_messages:
                continue
            received.extend(m.message for m in response.received_messages)
            self._client.acknowledge(
                request={
                    "subscription": self.path,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
        return received

    def close(self) -> None:
        self._client.close()
