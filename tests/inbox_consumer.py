"""A consuming service for the inbox fault tests, run as its own process.

Settings come from the environment: MONGODB_URI, CONSUMER_DB, CONSUMER_NAME,
CONSUMER_SUBSCRIPTION, and optionally CONSUMER_FORWARD_TOPIC (emit one event per message to
it, in the same transaction) and CONSUMER_DIE_AFTER_COMMITS (kill -9 itself right after that
many commits, before their acks).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from google.cloud.pubsub_v1.types import FlowControl
from pymongo import MongoClient, ReturnDocument

from mongo_outbox import Inbox


def main() -> None:
    env = os.environ
    logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s")
    logging.getLogger("google").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)
    client: MongoClient[Any] = MongoClient(env["MONGODB_URI"])
    db = client[env["CONSUMER_DB"]]
    forward = env.get("CONSUMER_FORWARD_TOPIC")
    die_after = int(env.get("CONSUMER_DIE_AFTER_COMMITS", "0"))
    inbox = Inbox(client, database=db.name, consumer=env["CONSUMER_NAME"])

    def handle(tx: Any, message: Any) -> None:
        event = message.attributes["outbox_event_id"]
        key = message.ordering_key
        # A per-key sequence, in the transaction: the order in which effects took place.
        seq = db.seq.find_one_and_update(
            {"_id": key},
            {"$inc": {"n": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=tx.session,
        )
        db.effects.insert_one({"event": event, "key": key, "n": seq["n"]}, session=tx.session)
        if forward:
            tx.emit(
                "Forwarded",
                message.data,
                topic=forward,
                key=key or None,
                attributes={"source_event": event},
            )

    commits = 0
    lock = threading.Lock()

    def after_commit(message: Any) -> None:
        nonlocal commits
        with lock:
            commits += 1
            if die_after and commits >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)

    inbox._after_commit = after_commit
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("consuming", flush=True)
    # Leases of 10 s: what a killed consumer held is redelivered 10 s later, not 60.
    flow = FlowControl(max_messages=50, max_duration_per_lease_extension=10)
    inbox.subscribe(env["CONSUMER_SUBSCRIPTION"], handle, stop=stop, flow_control=flow)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
