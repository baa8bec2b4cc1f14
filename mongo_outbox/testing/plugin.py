"""pytest plugin providing real MongoDB and Pub/Sub emulator fixtures.

Registered through the ``pytest11`` entry point ``mongo_outbox``.  Services come
from ``MONGODB_URI`` / ``PUBSUB_EMULATOR_HOST`` when set, otherwise they are
started once per session.  A service that cannot be found or started skips the
tests that need it, or fails them when ``MONGO_OUTBOX_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
from pymongo import MongoClient

from ._emulator import PubSubEmulator
from ._errors import ServiceUnavailable
from ._mongod import MongoReplicaSet
from ._pubsub import EmulatorSubscription

__all__ = [
    "REQUIRE_SERVICES_ENV",
    "mongo_client",
    "mongo_replica_set",
    "mongodb_uri",
    "outbox_database",
    "pubsub_emulator",
    "pubsub_emulator_host",
    "pubsub_project",
    "pubsub_subscription",
    "require_services",
    "unavailable",
]

REQUIRE_SERVICES_ENV = "MONGO_OUTBOX_REQUIRE_SERVICES"
_TRUE = {"1", "true", "yes", "on"}


def require_services() -> bool:
    """Whether ``MONGO_OUTBOX_REQUIRE_SERVICES`` asks for missing services to fail tests."""
    return os.environ.get(REQUIRE_SERVICES_ENV, "").strip().lower() in _TRUE


def unavailable(reason: str) -> NoReturn:
    """Skip the current test because a service is missing, or fail it if services are required."""
    if require_services():
        pytest.fail(f"{reason} [{REQUIRE_SERVICES_ENV} is set]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def _mongo_outbox_replica_set() -> Iterator[MongoReplicaSet | None]:
    """The session's own replica set, or ``None`` when ``MONGODB_URI`` is used."""
    if os.environ.get("MONGODB_URI"):
        yield None
        return
    # Test commands give tests the failCommand fail point (transient errors on demand).
    replica_set = MongoReplicaSet(extra_args=["--setParameter", "enableTestCommands=1"])
    try:
        replica_set.start()
    except ServiceUnavailable as exc:
        unavailable(str(exc))
    try:
        yield replica_set
    finally:
        replica_set.stop()


@pytest.fixture(scope="session")
def mongodb_uri(_mongo_outbox_replica_set: MongoReplicaSet | None) -> str:
    """URI of a MongoDB replica set: ``MONGODB_URI`` or one started for the session."""
    if _mongo_outbox_replica_set is None:
        return os.environ["MONGODB_URI"]
    return _mongo_outbox_replica_set.uri


@pytest.fixture(scope="session")
def mongo_replica_set(_mongo_outbox_replica_set: MongoReplicaSet | None) -> MongoReplicaSet:
    """The session's :class:`MongoReplicaSet`, for tests that kill or restart it.

    Unavailable (skip, or fail under ``MONGO_OUTBOX_REQUIRE_SERVICES``) when
    ``MONGODB_URI`` points at an external deployment.  Tests that stop it must
    leave it running again.
    """
    if _mongo_outbox_replica_set is None:
        unavailable(
            "needs a mongod started by the test session (fault injection); "
            "unset MONGODB_URI to let the tests start their own"
        )
    return _mongo_outbox_replica_set


@pytest.fixture
def mongo_client(mongodb_uri: str) -> Iterator[MongoClient[dict[str, Any]]]:
    """A :class:`pymongo.MongoClient` for :func:`mongodb_uri`, closed after the test."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_uri)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def outbox_database(mongo_client: MongoClient[dict[str, Any]]) -> Iterator[str]:
    """A unique database name, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        mongo_client.drop_database(name)


@pytest.fixture(scope="session")
def _mongo_outbox_pubsub_emulator() -> Iterator[PubSubEmulator | None]:
    """The session's own emulator, or ``None`` when ``PUBSUB_EMULATOR_HOST`` is set.

    A started emulator is exported as ``PUBSUB_EMULATOR_HOST`` for the session.
    """
    if os.environ.get("PUBSUB_EMULATOR_HOST"):
        yield None
        return
    emulator = PubSubEmulator()
    try:
        emulator.start()
    except ServiceUnavailable as exc:
        unavailable(str(exc))
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    try:
        yield emulator
    finally:
        if os.environ.get("PUBSUB_EMULATOR_HOST") == emulator.host:
            del os.environ["PUBSUB_EMULATOR_HOST"]
        emulator.stop()


@pytest.fixture(scope="session")
def pubsub_emulator_host(_mongo_outbox_pubsub_emulator: PubSubEmulator | None) -> str:
    """``host:port`` of a Pub/Sub emulator: ``PUBSUB_EMULATOR_HOST`` or one started here.

    Either way ``PUBSUB_EMULATOR_HOST`` holds it while the session runs, so
    ``google.cloud.pubsub_v1`` clients created in tests talk to the emulator.
    """
    if _mongo_outbox_pubsub_emulator is None:
        return os.environ["PUBSUB_EMULATOR_HOST"]
    return _mongo_outbox_pubsub_emulator.host


@pytest.fixture(scope="session")
def pubsub_emulator(_mongo_outbox_pubsub_emulator: PubSubEmulator | None) -> PubSubEmulator:
    """The session's :class:`PubSubEmulator`, for tests that pause or resume it.

    Unavailable (skip, or fail under ``MONGO_OUTBOX_REQUIRE_SERVICES``) when
    ``PUBSUB_EMULATOR_HOST`` points at an external emulator.  Tests that pause it
    must resume it.
    """
    if _mongo_outbox_pubsub_emulator is None:
        unavailable(
            "needs a Pub/Sub emulator started by the test session (fault injection); "
            "unset PUBSUB_EMULATOR_HOST to let the tests start their own"
        )
    return _mongo_outbox_pubsub_emulator


@pytest.fixture
def pubsub_project() -> str:
    """A unique project id (the emulator accepts any)."""
    return f"test-proj-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pubsub_subscription(
    pubsub_emulator_host: str, pubsub_project: str
) -> Iterator[EmulatorSubscription]:
    """A fresh topic with an ordered subscription on the emulator (an
    :class:`EmulatorSubscription`: ``path``, ``topic``, ``publish()``, ``deliver_twice()``),
    deleted after the test."""
    subscription = EmulatorSubscription(pubsub_project)
    try:
        yield subscription
    finally:
        subscription.close()
