"""The hand-rolled polling relay a user would write instead of mongo-outbox (the baseline).

Loop: read the oldest pending events, publish each with the stock high-level client (ordering
on, the same batch settings as the raw scenario), wait for every future, mark them published
with one ``update_many``; stop when nothing is pending.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from google.cloud import pubsub_v1
from pymongo import ASCENDING
from pymongo.collection import Collection

BATCH = 500


def make_publisher() -> pubsub_v1.PublisherClient:
    """The stock client as the raw scenario configures it."""
    return pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=1000, max_latency=0.01),
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
    )


def _iso(value: _dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def drain(outbox: Collection[Any], publisher: pubsub_v1.PublisherClient, topic_path: str) -> int:
    """Publish every pending event of ``outbox`` to ``topic_path``; return how many."""
    published = 0
    while True:
        docs = list(outbox.find({"status": "pending"}).sort("_id", ASCENDING).limit(BATCH))
        if not docs:
            return published
        futures = [
            publisher.publish(
                topic_path,
                doc["payload"],
                ordering_key=doc.get("key") or "",
                outbox_event_id=str(doc["_id"]),
                outbox_event_type=doc["type"],
                outbox_created_at=_iso(doc["created_at"]),
                **(doc.get("attributes") or {}),
            )
            for doc in docs
        ]
        for future in futures:
            future.result(timeout=120)
        outbox.update_many(
            {"_id": {"$in": [doc["_id"] for doc in docs]}},
            {
                "$set": {
                    "status": "published",
                    "published_at": _dt.datetime.now(_dt.timezone.utc),
                }
            },
        )
        published += len(docs)
