"""MongoDB's errors mapped at one boundary: library users get the package's errors too."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from mongo_outbox import ConfigurationError, ConnectError, Inbox, ensure_indexes, outbox_transaction
from mongo_outbox._mongo_errors import is_auth_failure, outbox_missing, raise_mapped


@pytest.fixture
def closed_uri() -> Iterator[str]:
    """A MongoDB URI of a loopback port bound but not listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"mongodb://127.0.0.1:{sock.getsockname()[1]}/?serverSelectionTimeoutMS=300"


def test_ensure_indexes_on_an_unreachable_server_raises_connect_error(closed_uri):
    with MongoClient(closed_uri) as client:
        with pytest.raises(ConnectError, match=r"cannot reach MongoDB to create d\.outbox") as info:
            ensure_indexes(client, database="d")
    assert isinstance(info.value.__cause__, ServerSelectionTimeoutError)


def test_inbox_collection_on_an_unreachable_server_raises_connect_error(closed_uri):
    with MongoClient(closed_uri) as client:
        with pytest.raises(ConnectError, match="cannot reach MongoDB"):
            Inbox(client, database="d", consumer="c").ensure_collection()


def test_a_transaction_on_an_unreachable_server_raises_connect_error(closed_uri):
    with MongoClient(closed_uri) as client:
        with pytest.raises(ConnectError, match="cannot reach MongoDB to write the outbox"):
            with outbox_transaction(client, database="d") as tx:
                tx.emit("E", b"x")


def test_an_async_transaction_on_an_unreachable_server_raises_connect_error(closed_uri):
    async def write() -> None:
        client: AsyncMongoClient[Any] = AsyncMongoClient(closed_uri)
        try:
            async with outbox_transaction(client, database="d") as tx:
                tx.emit("E", b"x")
        finally:
            await client.close()

    with pytest.raises(ConnectError, match="cannot reach MongoDB to write the outbox"):
        asyncio.run(write())


def test_the_callers_own_errors_in_the_block_pass_unchanged(closed_uri):
    with MongoClient(closed_uri) as client:
        with pytest.raises(ServerSelectionTimeoutError):
            with outbox_transaction(client, database="d") as tx:
                client.d.orders.insert_one({"_id": 1}, session=tx.session)


@pytest.mark.parametrize(
    ("code", "auth"), [(13, True), (18, True), (11000, False), (48, False), (None, False)]
)
def test_auth_failures_are_codes_13_and_18(code, auth):
    assert is_auth_failure(OperationFailure("refused", code)) is auth
    assert is_auth_failure(ValueError("13")) is False


def test_a_standalone_server_is_a_configuration_error():
    exc = OperationFailure(
        "Transaction numbers are only allowed on a replica set member or mongos", 20
    )
    with pytest.raises(ConfigurationError, match=r"standalone MongoDB server.*--replSet"):
        raise_mapped(exc, "commit")
    raise_mapped(OperationFailure("something else", 20), "commit")  # not ours to map


def test_outbox_missing_names_the_fix_and_creates_nothing(client, db_name):
    outbox = client[f"{db_name}_none"].outbox
    missing = outbox_missing(outbox)
    assert missing is not None
    assert f"no outbox collection {db_name}_none.outbox" in missing
    assert "mongo-outbox init" in missing
    assert f"{db_name}_none" not in client.list_database_names()
    ensure_indexes(client, database=db_name)
    assert outbox_missing(client[db_name].outbox) is None
