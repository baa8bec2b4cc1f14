"""Real MongoDB and Pub/Sub services for tests, plus a pytest plugin (``plugin``).

Nothing here is mocked: :class:`MongoReplicaSet` runs a real ``mongod`` as a
single-node replica set and :class:`PubSubEmulator` runs the Google Cloud
Pub/Sub emulator.
"""

from __future__ import annotations

from ._emulator import PubSubEmulator, find_pubsub_emulator
from ._errors import ServiceStartError, ServiceUnavailable
from ._mongod import MongoReplicaSet, find_mongod
from ._pubsub import EmulatorSubscription, subscribe_until

__all__ = [
    "EmulatorSubscription",
    "MongoReplicaSet",
    "PubSubEmulator",
    "ServiceStartError",
    "ServiceUnavailable",
    "find_mongod",
    "find_pubsub_emulator",
    "subscribe_until",
]
