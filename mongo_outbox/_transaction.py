"""The write side: commit domain writes and outbox events in one transaction.

A sans-I/O :class:`_EventBuffer` validates and collects events; thin sync and async shells run
the transaction around it and write the buffered events with one ``insert_many`` before commit.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from bson import ObjectId
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError
from pymongo.write_concern import WriteConcern

from ._document import build_document
from ._errors import ConfigurationError, OutboxError
from ._event_spec import resolve_event
from ._mongo_errors import MAX_TIME_EXPIRED, raise_if_standalone, raise_mapped
from ._tracing import current_trace

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "AsyncOutboxTransaction",
    "OutboxTransaction",
    "emit_in",
    "outbox_transaction",
    "run_in_outbox_transaction",
]

T = TypeVar("T")

# PyMongo's with_transaction gives up retrying after 120 seconds; the commit retry here does too.
_COMMIT_RETRY_SECONDS = 120.0
_UNKNOWN_COMMIT = "UnknownTransactionCommitResult"
_DEFAULT_WRITE_CONCERN = WriteConcern("majority")


def _is_async_client(client: Any) -> bool:
    if isinstance(client, MongoClient):
        return False
    if isinstance(client, AsyncMongoClient):
        return True
    if type(client).__module__.startswith("motor."):
        return True
    raise TypeError(
        "outbox transactions need a pymongo.MongoClient, a pymongo.AsyncMongoClient or a Motor "
        f"client, not {type(client).__name__} (mongomock has no transactions)"
    )


def _database_name(client: Any, database: str | None) -> str:
    if database:
        return database
    try:
        return str(client.get_default_database().name)
    except (ConfigurationError, PyMongoError, TypeError) as exc:
        raise ConfigurationError(
            "no database given: pass database=... or put one in the connection string"
        ) from exc


def _commit_should_retry(exc: PyMongoError, started: float) -> bool:
    if time.monotonic() - started >= _COMMIT_RETRY_SECONDS:
        return False
    if not exc.has_error_label(_UNKNOWN_COMMIT):
        return False
    return not (isinstance(exc, OperationFailure) and exc.code == MAX_TIME_EXPIRED)


def _document(event: Any, payload: Any, topic: Any, key: Any, attributes: Any) -> dict[str, Any]:
    """The validated outbox document of an ``emit`` call (an event type, or a typed model)."""
    event_type, payload, topic, key = resolve_event(event, payload, topic, key)
    return build_document(
        event_type, payload, topic=topic, key=key, attributes=attributes, trace=current_trace()
    )


class _EventBuffer:
    """Validated outbox documents waiting for the commit."""

    __slots__ = ("_docs",)

    def __init__(self) -> None:
        self._docs: list[dict[str, Any]] = []

    def emit(
        self,
        event: str | BaseModel,
        payload: Mapping[str, Any] | bytes | str | None = None,
        *,
        topic: str | None = None,
        key: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> ObjectId:
        doc = _document(event, payload, topic, key, attributes)
        self._docs.append(doc)
        event_id: ObjectId = doc["_id"]
        return event_id

    def take(self) -> list[dict[str, Any]]:
        docs, self._docs = self._docs, []
        return docs

    def clear(self) -> None:
        self._docs = []


# Why a transaction object is not live, completed by what the caller tried ("emit", ...).
_NOT_STARTED = "the outbox transaction has not started: use it in {block}"
_ENDED = "the outbox transaction has ended (committed/aborted): {action} inside the block"
_FN_RETURNED = (
    "run_in_outbox_transaction's fn has returned (or raised), so this tx's transaction has "
    "ended: {action} inside fn, with the tx it is given"
)
_ALREADY_STARTED = (
    "this outbox transaction has already started, and a transaction object runs once: "
    "call outbox_transaction(...) again for a new transaction"
)


class _TransactionBase:
    """State shared by the sync and async shells: live only between its start and its end."""

    _BLOCK = "a with block"

    def __init__(self, client: Any, database: str | None, collection: str) -> None:
        self._client = client
        self._database = _database_name(client, database)
        self._collection_name = collection
        self._events = _EventBuffer()
        self._session: Any = None
        self._refusal: str | None = _NOT_STARTED

    def _live_session(self, action: str) -> Any:
        if self._refusal is not None:
            raise OutboxError(self._refusal.format(block=self._BLOCK, action=action))
        return self._session

    def _enter(self, session: Any) -> None:
        """Go live in ``session``'s new transaction, with an empty buffer."""
        self._events.clear()
        self._session = session
        self._refusal = None

    def _check_can_enter(self) -> None:
        if self._refusal != _NOT_STARTED:
            raise OutboxError(_ALREADY_STARTED)

    @classmethod
    def _in_session(cls, client: Any, database: str | None, collection: str, session: Any) -> Any:
        """An object live in ``session``'s transaction (run_in_outbox_transaction's ``tx``)."""
        tx = cls(client, database, collection)
        tx._enter(session)
        return tx

    def _end(self, reason: str = _ENDED) -> None:
        """Leave the transaction for good: emit and session refuse from now on."""
        self._events.clear()
        self._session = None
        self._refusal = reason

    @property
    def session(self) -> Any:
        """The client session of the transaction: pass it to every domain write."""
        return self._live_session("use tx.session")

    @property
    def database(self) -> str:
        """Name of the database holding the outbox collection."""
        return self._database

    def emit(
        self,
        event: str | BaseModel,
        payload: Mapping[str, Any] | bytes | str | None = None,
        *,
        topic: str | None = None,
        key: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> ObjectId:
        """Validate an event and queue it for the commit; return its event id.

        ``event`` is the event type, or a pydantic model whose class is declared with
        :func:`mongo_outbox.typed.event` (its type, topic and key come from the class, its
        payload is ``model_dump(mode="json")``; give no payload, topic or key then).
        ``payload`` is a dict (published as JSON), bytes (as is) or str (UTF-8). ``topic`` falls
        back to the relay's default topic; events with the same ``key`` are published in
        commit order. Raises :class:`~mongo_outbox.ValidationError` at once when the event
        breaks a rule or a Pub/Sub limit; nothing has been written then. Outside the
        transaction (before the block, after it) it raises :class:`~mongo_outbox.OutboxError`.
        """
        self._live_session("emit")
        return self._events.emit(event, payload, topic=topic, key=key, attributes=attributes)

    def _collection(self) -> Any:
        return self._client[self._database][self._collection_name]

    def _take_for_write(self) -> list[dict[str, Any]]:
        """The buffered documents, provided the transaction is still open to take them."""
        docs = self._events.take()
        if docs and not self._session.in_transaction:
            # Written now they would commit on their own, without the domain writes.
            raise OutboxError(
                f"the transaction was ended inside the block, so its {len(docs)} event(s) were "
                "not written: leave commit and abort to the outbox transaction"
            )
        return docs


class OutboxTransaction(_TransactionBase):
    """A transaction on a :class:`pymongo.MongoClient` that can emit outbox events."""

    def __init__(
        self,
        client: MongoClient[Any],
        database: str | None = None,
        collection: str = "outbox",
        *,
        write_concern: WriteConcern | None = None,
    ) -> None:
        super().__init__(client, database, collection)
        self._write_concern = write_concern or _DEFAULT_WRITE_CONCERN

    def _flush(self) -> None:
        docs = self._take_for_write()
        if len(docs) == 1:  # the common case; insert_one skips the bulk-write machinery
            self._collection().insert_one(docs[0], session=self._session)
        elif docs:
            self._collection().insert_many(docs, ordered=True, session=self._session)

    def __enter__(self) -> OutboxTransaction:
        self._check_can_enter()
        session = self._client.start_session()
        try:
            session.start_transaction(write_concern=self._write_concern)
        except BaseException:
            session.end_session()
            raise
        self._enter(session)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self._session
        try:
            if exc_type is not None:
                if session.in_transaction:
                    session.abort_transaction()
                raise_if_standalone(exc)
                return
            try:
                self._flush()
            except BaseException as err:
                if session.in_transaction:
                    session.abort_transaction()
                raise_mapped(err, "write the outbox")
                raise
            if not session.in_transaction:
                return  # ended inside the block, with no events: nothing left to commit
            started = time.monotonic()
            while True:
                try:
                    session.commit_transaction()
                    return
                except (ConnectionFailure, OperationFailure) as err:
                    if not _commit_should_retry(err, started):
                        raise_mapped(err, "commit")
                        raise
        finally:
            self._end()
            session.end_session()


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class AsyncOutboxTransaction(_TransactionBase):
    """A transaction on a PyMongo ``AsyncMongoClient`` or a Motor client."""

    _BLOCK = "an async with block"

    def __init__(
        self,
        client: Any,
        database: str | None = None,
        collection: str = "outbox",
        *,
        write_concern: WriteConcern | None = None,
    ) -> None:
        super().__init__(client, database, collection)
        self._write_concern = write_concern or _DEFAULT_WRITE_CONCERN

    async def _flush(self) -> None:
        docs = self._take_for_write()
        if len(docs) == 1:
            await self._collection().insert_one(docs[0], session=self._session)
        elif docs:
            await self._collection().insert_many(docs, ordered=True, session=self._session)

    async def __aenter__(self) -> AsyncOutboxTransaction:
        self._check_can_enter()
        # PyMongo's start_session is plain and start_transaction a coroutine; Motor the reverse.
        session = await _maybe_await(self._client.start_session())
        try:
            await _maybe_await(session.start_transaction(write_concern=self._write_concern))
        except BaseException:
            await _maybe_await(session.end_session())
            raise
        self._enter(session)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self._session
        try:
            if exc_type is not None:
                if session.in_transaction:
                    await session.abort_transaction()
                raise_if_standalone(exc)
                return
            try:
                await self._flush()
            except BaseException as err:
                if session.in_transaction:
                    await session.abort_transaction()
                raise_mapped(err, "write the outbox")
                raise
            if not session.in_transaction:
                return  # ended inside the block, with no events: nothing left to commit
            started = time.monotonic()
            while True:
                try:
                    await session.commit_transaction()
                    return
                except (ConnectionFailure, OperationFailure) as err:
                    if not _commit_should_retry(err, started):
                        raise_mapped(err, "commit")
                        raise
        finally:
            self._end()
            await _maybe_await(session.end_session())


@overload
def outbox_transaction(
    client: MongoClient[Any],
    database: str | None = ...,
    collection: str = ...,
    *,
    write_concern: WriteConcern | None = ...,
) -> OutboxTransaction: ...


@overload
def outbox_transaction(
    client: AsyncMongoClient[Any],
    database: str | None = ...,
    collection: str = ...,
    *,
    write_concern: WriteConcern | None = ...,
) -> AsyncOutboxTransaction: ...


def outbox_transaction(
    client: Any,
    database: str | None = None,
    collection: str = "outbox",
    *,
    write_concern: WriteConcern | None = None,
) -> OutboxTransaction | AsyncOutboxTransaction:
    """Open a transaction whose domain writes and emitted events commit together.

    Use ``with`` for a :class:`pymongo.MongoClient`, ``async with`` for an ``AsyncMongoClient``
    or a Motor client. Leaving the block writes the events and commits (retrying the commit
    on ``UnknownTransactionCommitResult``); an exception aborts everything and propagates.
    The body is not re-run on transient errors: use :func:`run_in_outbox_transaction` for that.
    ``write_concern`` defaults to majority.
    """
    if _is_async_client(client):
        return AsyncOutboxTransaction(client, database, collection, write_concern=write_concern)
    return OutboxTransaction(client, database, collection, write_concern=write_concern)


@overload
def run_in_outbox_transaction(
    client: MongoClient[Any],
    fn: Callable[[OutboxTransaction], T],
    *,
    database: str | None = ...,
    collection: str = ...,
    write_concern: WriteConcern | None = ...,
) -> T: ...


@overload
def run_in_outbox_transaction(
    client: AsyncMongoClient[Any],
    fn: Callable[[AsyncOutboxTransaction], Awaitable[T]],
    *,
    database: str | None = ...,
    collection: str = ...,
    write_concern: WriteConcern | None = ...,
) -> Awaitable[T]: ...


def run_in_outbox_transaction(
    client: Any,
    fn: Callable[[Any], Any],
    *,
    database: str | None = None,
    collection: str = "outbox",
    write_concern: WriteConcern | None = None,
) -> Any:
    """Run ``fn(tx)`` in a transaction with PyMongo's ``with_transaction`` retry rules.

    ``fn`` may run more than once (on ``TransientTransactionError``), each time with fresh
    events, so it must do nothing outside the transaction that cannot be repeated. For an
    async client ``fn`` is a coroutine function and the call returns an awaitable.
    """
    wc = write_concern or _DEFAULT_WRITE_CONCERN
    if _is_async_client(client):
        return _run_async(client, fn, database, collection, wc)
    with client.start_session() as session:

        def callback(s: Any) -> Any:
            tx: OutboxTransaction = OutboxTransaction._in_session(client, database, collection, s)
            try:
                result = fn(tx)
                tx._flush()
            finally:
                tx._end(_FN_RETURNED)
            return result

        try:
            return session.with_transaction(callback, write_concern=wc)
        except OperationFailure as exc:
            raise_if_standalone(exc)
            raise


async def _run_async(
    client: Any,
    fn: Callable[[Any], Any],
    database: str | None,
    collection: str,
    wc: WriteConcern,
) -> Any:
    session = await _maybe_await(client.start_session())
    try:

        async def callback(s: Any) -> Any:
            tx: AsyncOutboxTransaction = AsyncOutboxTransaction._in_session(
                client, database, collection, s
            )
            try:
                result = await _maybe_await(fn(tx))
                await tx._flush()
            finally:
                tx._end(_FN_RETURNED)
            return result

        try:
            return await session.with_transaction(callback, write_concern=wc)
        except OperationFailure as exc:
            raise_if_standalone(exc)
            raise
    finally:
        await _maybe_await(session.end_session())


def emit_in(
    session: Any,
    event: str | BaseModel,
    payload: Mapping[str, Any] | bytes | str | None = None,
    *,
    database: str,
    topic: str | None = None,
    key: str | None = None,
    attributes: Mapping[str, str] | None = None,
    collection: str = "outbox",
) -> Any:
    """Insert an event into ``<database>.<collection>`` at once, in the transaction ``session``
    is running (one someone else started: an ODM's, your own); return its event id.

    The event commits or aborts with that transaction. ``event``, ``payload``, ``topic``,
    ``key`` and ``attributes`` are :meth:`OutboxTransaction.emit`'s. With an async session
    (PyMongo's ``AsyncClientSession``, Motor's) it returns an awaitable of the id. Raises
    :class:`~mongo_outbox.OutboxError` when ``session`` is not in a transaction (the event
    would commit on its own), :class:`~mongo_outbox.ValidationError` when the event is invalid.
    """
    client = getattr(session, "client", None)
    if client is None or not hasattr(session, "in_transaction"):
        raise OutboxError(
            f"emit_in needs a PyMongo or Motor client session, not {type(session).__name__} "
            "(with ODMantic, pass transaction.get_driver_session())"
        )
    if not session.in_transaction:
        raise OutboxError(
            "emit_in needs a session in a transaction (session.start_transaction(), or your "
            "ODM's transaction): outside one the event would commit without your writes"
        )
    doc = _document(event, payload, topic, key, attributes)
    outbox = client[database][collection]
    if _is_async_client(client):
        return _insert_async(outbox, doc, session)
    outbox.insert_one(doc, session=session)
    event_id: ObjectId = doc["_id"]
    return event_id


async def _insert_async(outbox: Any, doc: dict[str, Any], session: Any) -> ObjectId:
    await outbox.insert_one(doc, session=session)
    event_id: ObjectId = doc["_id"]
    return event_id
