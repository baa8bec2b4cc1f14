"""The write side against a real replica set: commit, abort, retries, async clients."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure

from mongo_outbox import (
    AsyncOutboxTransaction,
    OutboxError,
    OutboxTransaction,
    ValidationError,
    outbox_transaction,
    run_in_outbox_transaction,
)


@contextmanager
def fail_point(client: MongoClient[Any], data: dict[str, Any], times: int = 1) -> Iterator[None]:
    """Arm the server's failCommand fail point for ``times`` commands."""
    try:
        client.admin.command(
            {"configureFailPoint": "failCommand", "mode": {"times": times}, "data": data}
        )
    except OperationFailure as exc:  # an external server without enableTestCommands
        pytest.fail(f"failCommand fail point unavailable: {exc}")
    try:
        yield
    finally:
        client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})


def test_commit_writes_domain_documents_and_events_together(client, db_name):
    with outbox_transaction(client, database=db_name) as tx:
        assert isinstance(tx, OutboxTransaction)
        client[db_name].orders.insert_one({"_id": 1}, session=tx.session)
        first = tx.emit("OrderCreated", {"id": 1}, topic="orders", key="o-1")
        second = tx.emit("OrderPaid", b"\x00raw", attributes={"a": "b"})
        # Nothing is visible outside the transaction before commit.
        assert client[db_name].outbox.count_documents({}) == 0
    docs = {d["_id"]: d for d in client[db_name].outbox.find()}
    assert set(docs) == {first, second}
    assert docs[first]["topic"] == "orders"
    assert docs[first]["key"] == "o-1"
    assert docs[first]["payload"] == b'{"id":1}'
    assert docs[first]["status"] == "pending"
    assert docs[second]["payload"] == b"\x00raw"
    assert docs[second]["attributes"] == {"a": "b"}
    assert docs[second]["topic"] is None
    assert client[db_name].orders.count_documents({}) == 1


def test_exception_aborts_both(client, db_name):
    with pytest.raises(KeyError), outbox_transaction(client, database=db_name) as tx:
        client[db_name].orders.insert_one({"_id": 1}, session=tx.session)
        tx.emit("OrderCreated", {"id": 1})
        raise KeyError("x")
    assert client[db_name].orders.count_documents({}) == 0
    assert client[db_name].outbox.count_documents({}) == 0


@pytest.mark.parametrize(
    ("emit", "match"),
    [
        ({"payload": {"x": object()}}, "JSON"),
        ({"payload": b"x" * 10_000_001}, "10,000,000"),
        ({"attributes": {f"a{i}": "v" for i in range(91)}}, "at most 90"),
        ({"attributes": {"googkey": "v"}}, "goog"),
        ({"key": "k" * 1025}, "1024"),
    ],
)
def test_invalid_emit_aborts_before_commit(client, db_name, emit, match):
    kwargs: dict[str, Any] = {"payload": {"ok": True}, **emit}
    payload = kwargs.pop("payload")
    with (
        pytest.raises(ValidationError, match=match),
        outbox_transaction(client, database=db_name) as tx,
    ):
        client[db_name].orders.insert_one({"_id": 1}, session=tx.session)
        tx.emit("Good", {"fine": 1})
        tx.emit("Bad", payload, **kwargs)
    assert client[db_name].orders.count_documents({}) == 0
    assert client[db_name].outbox.count_documents({}) == 0


def test_commit_is_retried_on_unknown_commit_result(client, db_name):
    with fail_point(
        client,
        {
            "failCommands": ["commitTransaction"],
            "errorCode": 64,  # WriteConcernFailed, with the label a lost reply gets
            "errorLabels": ["UnknownTransactionCommitResult"],
        },
        times=2,
    ):
        with outbox_transaction(client, database=db_name) as tx:
            client[db_name].orders.insert_one({"_id": 1}, session=tx.session)
            event_id = tx.emit("OrderCreated", {"id": 1})
    assert client[db_name].outbox.find_one({"_id": event_id}) is not None
    assert client[db_name].orders.count_documents({}) == 1


def test_run_in_outbox_transaction_retries_the_whole_function(client, db_name):
    calls: list[ObjectId] = []
    attempts = []

    def work(tx: OutboxTransaction) -> ObjectId:
        attempts.append(1)
        client[db_name].orders.insert_one({"_id": len(calls)}, session=tx.session)
        event_id = tx.emit("OrderCreated", {"attempt": len(calls)})
        calls.append(event_id)
        return event_id

    with fail_point(
        client,
        {
            "failCommands": ["insert"],
            "errorCode": 112,  # WriteConflict: a TransientTransactionError
            "errorLabels": ["TransientTransactionError"],
        },
    ):
        result = run_in_outbox_transaction(client, work, database=db_name)
    assert len(attempts) == 2, "the failed first attempt must have been re-run"
    assert result == calls[-1]
    # Only the committed attempt's event and document exist.
    assert [d["_id"] for d in client[db_name].outbox.find()] == [calls[-1]]
    assert client[db_name].orders.count_documents({}) == 1


def test_outbox_transaction_rejects_clients_without_transactions():
    import mongomock

    with pytest.raises(TypeError, match="mongomock"):
        outbox_transaction(mongomock.MongoClient(), database="x")


def test_database_defaults_to_the_uri_database(mongodb_uri, outbox_database):
    base, _, query = mongodb_uri.partition("?")
    uri = f"{base.rstrip('/')}/{outbox_database}?{query}"
    with MongoClient(uri) as c:
        with outbox_transaction(c) as tx:
            tx.emit("E", "x")
        assert c[outbox_database].outbox.count_documents({}) == 1


# -- async: PyMongo's native async client and Motor ---------------------------------------


async def _async_roundtrip(client: Any, db: str) -> None:
    async with outbox_transaction(client, database=db) as tx:
        assert isinstance(tx, AsyncOutboxTransaction)
        await client[db].orders.insert_one({"_id": 1}, session=tx.session)
        kept = tx.emit("OrderCreated", {"id": 1}, key="o-1")
    with pytest.raises(RuntimeError):
        async with outbox_transaction(client, database=db) as tx:
            await client[db].orders.insert_one({"_id": 2}, session=tx.session)
            tx.emit("OrderCreated", {"id": 2}, key="o-2")
            raise RuntimeError("abort")
    with pytest.raises(ValidationError):
        async with outbox_transaction(client, database=db) as tx:
            await client[db].orders.insert_one({"_id": 3}, session=tx.session)
            tx.emit("OrderCreated", {"id": 3}, attributes={"goog-x": "1"})

    async def work(tx: AsyncOutboxTransaction) -> ObjectId:
        await client[db].orders.insert_one({"_id": 4}, session=tx.session)
        return tx.emit("OrderCreated", {"id": 4}, key="o-4")

    via_fn = await run_in_outbox_transaction(client, work, database=db)
    ids = [d["_id"] async for d in client[db].outbox.find({}, sort=[("_id", 1)])]
    assert ids == [kept, via_fn]
    assert sorted([d["_id"] async for d in client[db].orders.find()]) == [1, 4]


def test_async_pymongo_client(mongodb_uri, db_name):
    async def main() -> None:
        client: AsyncMongoClient[Any] = AsyncMongoClient(mongodb_uri)
        try:
            await _async_roundtrip(client, db_name)
        finally:
            await client.close()

    asyncio.run(main())


def test_motor_client(mongodb_uri, db_name):
    from motor.motor_asyncio import AsyncIOMotorClient

    async def main() -> None:
        client = AsyncIOMotorClient(mongodb_uri)
        try:
            await _async_roundtrip(client, db_name)
        finally:
            client.close()

    asyncio.run(main())


def test_ending_the_transaction_inside_the_block_does_not_write_events_alone(client, db_name):
    from mongo_outbox import OutboxError

    with pytest.raises(OutboxError, match="ended inside the block"):
        with outbox_transaction(client, database=db_name) as tx:
            client[db_name].orders.insert_one({"_id": 1}, session=tx.session)
            tx.emit("OrderCreated", {"id": 1})
            tx.session.abort_transaction()
    assert client[db_name].outbox.count_documents({}) == 0
    assert client[db_name].orders.count_documents({}) == 0

    def aborts(tx: OutboxTransaction) -> None:
        tx.emit("OrderCreated", {"id": 2})
        tx.session.abort_transaction()

    with pytest.raises(OutboxError, match="ended inside the block"):
        run_in_outbox_transaction(client, aborts, database=db_name)
    assert client[db_name].outbox.count_documents({}) == 0
    # Ended inside the block without events: nothing to commit, no error.
    with outbox_transaction(client, database=db_name) as tx:
        tx.session.abort_transaction()


# -- the transaction object outside its transaction -----------------------------------------

NOT_STARTED = r"has not started: use it in an? (async )?with block"
ENDED = r"has ended \(committed/aborted\): emit inside the block"
SESSION_ENDED = r"has ended \(committed/aborted\)"
RETURNED = r"run_in_outbox_transaction.*fn has returned"
USED = r"has already started"


def test_emit_and_session_before_the_block_are_refused(client, db_name):
    tx = outbox_transaction(client, database=db_name)
    with pytest.raises(OutboxError, match=NOT_STARTED):
        tx.emit("OrderCreated", {"id": 1})
    with pytest.raises(OutboxError, match=NOT_STARTED):
        tx.session  # noqa: B018
    with tx:  # refusals do not spoil a transaction never entered
        tx.emit("OrderCreated", {"id": 2})
    assert [d["payload"] for d in client[db_name].outbox.find()] == [b'{"id":2}']


def test_emit_and_session_after_the_block_are_refused(client, db_name):
    with outbox_transaction(client, database=db_name) as tx:
        kept = tx.emit("OrderCreated", {"id": 1})
    with pytest.raises(OutboxError, match=ENDED):
        tx.emit("OrderCreated", {"id": 2})
    with pytest.raises(OutboxError, match=SESSION_ENDED):
        tx.session  # noqa: B018
    assert [d["_id"] for d in client[db_name].outbox.find()] == [kept]


def test_emit_after_an_aborted_block_is_refused(client, db_name):
    with pytest.raises(KeyError), outbox_transaction(client, database=db_name) as tx:
        tx.emit("OrderCreated", {"id": 1})
        raise KeyError("x")
    with pytest.raises(OutboxError, match=ENDED):
        tx.emit("OrderCreated", {"id": 2})
    assert client[db_name].outbox.count_documents({}) == 0


def test_a_used_transaction_cannot_be_entered_again(client, db_name):
    tx = outbox_transaction(client, database=db_name)
    with pytest.raises(KeyError), tx:
        tx.emit("Stale", {"id": 1})
        raise KeyError("x")
    with pytest.raises(OutboxError, match=USED), tx:
        client[db_name].orders.insert_one({"_id": 2})
    with tx.__class__(client, db_name) as fresh:  # a new object starts empty
        fresh.emit("Fresh", {"id": 3})
    committed = outbox_transaction(client, database=db_name)
    with committed:
        committed.emit("Committed", {"id": 4})
    with pytest.raises(OutboxError, match=USED), committed:
        pass
    assert sorted(d["type"] for d in client[db_name].outbox.find()) == ["Committed", "Fresh"]


def test_a_transaction_cannot_be_entered_inside_itself(client, db_name):
    with pytest.raises(OutboxError, match=USED):
        with outbox_transaction(client, database=db_name) as tx:
            tx.emit("Outer", {"id": 1})
            with tx:
                tx.emit("Inner", {"id": 2})
    assert client[db_name].outbox.count_documents({}) == 0


def test_tx_kept_from_run_in_outbox_transaction_is_refused_after_fn_returns(client, db_name):
    def work(tx: OutboxTransaction) -> OutboxTransaction:
        tx.emit("OrderCreated", {"id": 1})
        return tx

    tx = run_in_outbox_transaction(client, work, database=db_name)
    with pytest.raises(OutboxError, match=RETURNED):
        tx.emit("OrderCreated", {"id": 2})
    with pytest.raises(OutboxError, match=RETURNED):
        tx.session  # noqa: B018
    with pytest.raises(OutboxError, match=USED), tx:
        pass
    assert client[db_name].outbox.count_documents({}) == 1


async def _async_outside_the_block(client: Any, db: str) -> None:
    outbox = client[db].outbox
    tx = outbox_transaction(client, database=db)
    with pytest.raises(OutboxError, match=NOT_STARTED):
        tx.emit("E", {"n": 1})
    with pytest.raises(OutboxError, match=NOT_STARTED):
        tx.session  # noqa: B018
    async with tx:
        kept = tx.emit("E", {"n": 2})
    with pytest.raises(OutboxError, match=ENDED):
        tx.emit("E", {"n": 3})
    with pytest.raises(OutboxError, match=SESSION_ENDED):
        tx.session  # noqa: B018
    with pytest.raises(OutboxError, match=USED):
        async with tx:
            pass

    aborted = outbox_transaction(client, database=db)
    with pytest.raises(KeyError):
        async with aborted:
            aborted.emit("Stale", {"n": 4})
            raise KeyError("x")
    with pytest.raises(OutboxError, match=ENDED):
        aborted.emit("E", {"n": 5})
    with pytest.raises(OutboxError, match=USED):
        async with aborted:
            await client[db].orders.insert_one({"_id": 6})

    async def work(tx: AsyncOutboxTransaction) -> AsyncOutboxTransaction:
        tx.emit("E", {"n": 7})
        return tx

    returned = await run_in_outbox_transaction(client, work, database=db)
    with pytest.raises(OutboxError, match=RETURNED):
        returned.emit("E", {"n": 8})
    with pytest.raises(OutboxError, match=RETURNED):
        returned.session  # noqa: B018

    docs = [d async for d in outbox.find({}, sort=[("_id", 1)])]
    assert [d["payload"] for d in docs] == [b'{"n":2}', b'{"n":7}']
    assert docs[0]["_id"] == kept
    assert await client[db].orders.count_documents({}) == 0


@pytest.mark.parametrize("driver", ["pymongo", "motor"])
def test_async_emit_outside_the_block_is_refused(mongodb_uri, db_name, driver):
    async def main() -> None:
        if driver == "motor":
            from motor.motor_asyncio import AsyncIOMotorClient

            motor = AsyncIOMotorClient(mongodb_uri)
            try:
                await _async_outside_the_block(motor, db_name)
            finally:
                motor.close()
        else:
            client: AsyncMongoClient[Any] = AsyncMongoClient(mongodb_uri)
            try:
                await _async_outside_the_block(client, db_name)
            finally:
                await client.close()

    asyncio.run(main())


# -- NUL in an attribute key: refused at emit, not at commit --------------------------------


def test_nul_in_an_attribute_key_is_refused_at_emit(client, db_name):
    reached: list[bool] = []
    with pytest.raises(ValidationError, match=r"'a\\x00b' contains a NUL character"):
        with outbox_transaction(client, database=db_name) as tx:
            client[db_name].orders.insert_one({"_id": 1}, session=tx.session)
            tx.emit("OrderCreated", {"id": 1}, attributes={"a\x00b": "v"})
            reached.append(True)
    assert reached == []  # raised by emit, not later
    assert client[db_name].orders.count_documents({}) == 0
    assert client[db_name].outbox.count_documents({}) == 0
    # Caught inside the block, the refused event leaves the rest of the transaction intact.
    with outbox_transaction(client, database=db_name) as tx:
        client[db_name].orders.insert_one({"_id": 2}, session=tx.session)
        good = tx.emit("OrderCreated", {"id": 2})
        with pytest.raises(ValidationError):
            tx.emit("OrderCreated", {"id": 2}, attributes={"\x00": "v"})
    assert [d["_id"] for d in client[db_name].orders.find()] == [2]
    assert [d["_id"] for d in client[db_name].outbox.find()] == [good]
