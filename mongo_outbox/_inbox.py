"""The consuming side: an inbox that makes each event's effect happen once.

For every message, one transaction inserts an inbox record keyed by the consumer and the
event id, runs the handler with a transaction object like ``outbox_transaction``'s (so it can
write and emit in the same transaction) and commits. A duplicate finds the record and runs
nothing. The message is acknowledged only after the commit: a crash before the ack redelivers
a message whose record is already committed, and it is acked as a duplicate.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from pymongo import MongoClient
from pymongo.errors import DuplicateKeyError
from pymongo.write_concern import WriteConcern

from ._errors import ConfigurationError
from ._formats import ATTR_EVENT_ID, ATTR_EVENT_TYPE, CE_TYPE
from ._mongo_errors import create_collection
from ._retention import set_retention
from ._times import utcnow
from ._transaction import (
    OutboxTransaction,
    _database_name,
    _is_async_client,
    run_in_outbox_transaction,
)

__all__ = ["Inbox", "InboxMessage", "InboxStats", "inbox_id"]

log = logging.getLogger("mongo_outbox.inbox")


class InboxMessage(Protocol):
    """What the inbox reads of a message: google-cloud-pubsub's subscriber ``Message`` has it."""

    @property
    def message_id(self) -> str: ...

    @property
    def attributes(self) -> Mapping[str, str]: ...


def inbox_id(consumer: str, message: InboxMessage) -> dict[str, str]:
    """The ``_id`` of a message's inbox record: the consumer and the event id.

    The event id is the ``outbox_event_id`` attribute; a message published by something else
    falls back to its Pub/Sub message id, which is weaker: a message published again gets a
    new one, so only the broker's redeliveries are recognised.
    """
    event_id = message.attributes.get(ATTR_EVENT_ID) or f"message:{message.message_id}"
    return {"consumer": consumer, "event_id": event_id}


@dataclass
class InboxStats:
    """Messages an :class:`Inbox` has seen since it was made."""

    #: Handlers that ran and committed.
    processed: int = 0
    #: Messages whose event had already been processed (nothing ran).
    duplicates: int = 0
    #: Handlers that raised (their transaction aborted).
    failed: int = 0


@dataclass
class _Outcome:
    ran: bool = True


class _Duplicate(Exception):
    """The inbox record exists: the message's effect has already been committed."""


class Inbox:
    """Effectively-once processing of messages for ``consumer``, recorded in
    ``<database>.<collection>``.

    ``client`` is a :class:`pymongo.MongoClient` (or an ``AsyncMongoClient`` / Motor client, for
    which :meth:`process` returns an awaitable and the handler may be a coroutine function).
    Events the handler emits go to ``<database>.<outbox>``, for a relay to publish.
    """

    def __init__(
        self,
        client: Any,
        *,
        database: str | None = None,
        consumer: str,
        collection: str = "inbox",
        outbox: str = "outbox",
        write_concern: WriteConcern | None = None,
    ) -> None:
        if not isinstance(consumer, str) or not consumer:
            raise ConfigurationError("consumer must be a non-empty string naming this consumer")
        self._async = _is_async_client(client)
        self.client = client
        self.database = _database_name(client, database)
        self.consumer = consumer
        self.collection = collection
        self.outbox = outbox
        self._write_concern = write_concern
        self.stats = InboxStats()
        self._stats_lock = threading.Lock()
        # Between the commit and the ack: a fault test kills the process here.
        self._after_commit: Callable[[Any], None] = lambda message: None

    def _count(self, outcome: str) -> None:
        with self._stats_lock:  # handlers run in several threads
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def _record(self, message: InboxMessage) -> dict[str, Any]:
        record: dict[str, Any] = {
            "_id": inbox_id(self.consumer, message),
            "processed_at": utcnow(),
            "message_id": message.message_id,
        }
        # The outbox format's type, else the CloudEvents format's.
        event_type = message.attributes.get(ATTR_EVENT_TYPE) or message.attributes.get(CE_TYPE)
        if event_type is not None:
            record["type"] = event_type
        return record

    def process(self, message: InboxMessage, handler: Handler) -> bool | Awaitable[bool]:
        """Run ``handler(tx, message)`` once per event, in one transaction with its record.

        Returns True when the handler ran and its transaction committed, False when the message
        is a duplicate (nothing ran). ``tx`` offers ``session`` and ``emit`` exactly like
        :func:`~mongo_outbox.outbox_transaction`'s. Transient transaction errors re-run the
        transaction (so the handler must do nothing outside it that cannot be repeated); the
        handler's own exception aborts everything and propagates. ``handler`` may also be a
        mapping of ``@event`` classes to ``handler(tx, event, message)`` or a
        :class:`mongo_outbox.typed.Handlers` (a message it rejects and records returns True).
        """
        handler = _dispatch(self, handler)
        if self._async:
            return self._process_async(message, handler)
        records = self.client[self.database][self.collection]
        record = self._record(message)

        def body(tx: OutboxTransaction) -> bool:
            try:
                records.insert_one(record, session=tx.session)
            except DuplicateKeyError:
                raise _Duplicate from None
            handler(tx, message)
            return True

        with self._outcome() as outcome:
            self._transaction(body)
        return outcome.ran

    async def _process_async(
        self, message: InboxMessage, handler: Callable[[Any, Any], Any]
    ) -> bool:
        records = self.client[self.database][self.collection]
        record = self._record(message)

        async def body(tx: Any) -> bool:
            try:
                await records.insert_one(record, session=tx.session)
            except DuplicateKeyError:
                raise _Duplicate from None
            result = handler(tx, message)
            if inspect.isawaitable(result):
                await result
            return True

        with self._outcome() as outcome:
            await self._transaction(body)
        return outcome.ran

    def _transaction(self, body: Callable[[Any], Any]) -> Any:
        """``body`` in one outbox transaction of this inbox (awaitable with an async client)."""
        return run_in_outbox_transaction(
            self.client,
            body,
            database=self.database,
            collection=self.outbox,
            write_concern=self._write_concern,
        )

    @contextmanager
    def _outcome(self) -> Iterator[_Outcome]:
        """Count how a message's transaction ended; a duplicate ends it without error."""
        outcome = _Outcome()
        try:
            yield outcome
        except _Duplicate:
            outcome.ran = False
            self._count("duplicates")
        except BaseException:
            self._count("failed")
            raise
        else:
            self._count("processed")

    def subscribe(
        self,
        subscription: str,
        handler: Handler,
        *,
        max_messages: int = 100,
        max_bytes: int = 100 * 1024 * 1024,
        stop: threading.Event | None = None,
        subscriber: Any = None,
        flow_control: Any = None,
    ) -> None:
        """Process the messages of ``subscription`` (``projects/<p>/subscriptions/<s>``) until
        ``stop`` is set, then finish the messages in hand, close and return.

        A streaming pull with flow control (at most ``max_messages`` messages and ``max_bytes``
        bytes outstanding). Each message is acked after its transaction committed, and so is a
        duplicate; a handler error nacks it (Pub/Sub redelivers it). On an ordered
        subscription the messages of one key are handled one at a time, in order.
        ``handler`` is :meth:`process`'s. ``subscriber`` is a
        ``google.cloud.pubsub_v1.SubscriberClient`` to use (default: a new one, closed on
        return); ``flow_control`` a ``google.cloud.pubsub_v1.types.FlowControl`` that replaces
        ``max_messages`` and ``max_bytes`` (its ``max_duration_per_lease_extension``
        also bounds how long a crashed consumer's messages wait before they are redelivered:
        60 s by default). Raises what ends the stream (a subscription that does not
        exist, for one).
        """
        if self._async:
            raise ConfigurationError(
                "Inbox.subscribe needs a pymongo.MongoClient: google-cloud-pubsub's subscriber "
                "calls handlers in threads. With an async client, await inbox.process(message, "
                "handler) from your own subscriber."
            )

        from ._inbox_pull import ACK_DEADLINE, BatchSubscriber, make_subscriber_client

        lease = ACK_DEADLINE
        if flow_control is not None:
            max_messages = int(flow_control.max_messages) or max_messages
            max_bytes = int(flow_control.max_bytes) or max_bytes
            lease = int(flow_control.max_duration_per_lease_extension) or lease
        own = subscriber is None
        client = make_subscriber_client() if own else subscriber
        run = _dispatch(self, handler)
        try:
            BatchSubscriber(
                client,
                subscription,
                lambda messages: self._process_batch(messages, run),
                max_messages=max_messages,
                max_bytes=max_bytes,
                ack_deadline=lease,
            ).run(stop or threading.Event())
        finally:
            if own:
                client.close()

    def _process_batch(self, messages: Sequence[Any], handler: Callable[[Any, Any], Any]) -> None:
        """Process ``messages`` in one transaction and ack them. When a handler raises, its
        message is nacked (with the later messages of its key, on an ordered subscription) and
        the others are processed again one transaction each, so they lose nothing by it."""
        records_of = self.client[self.database][self.collection]
        records = [self._record(m) for m in messages]
        failed: list[Any] = []

        def body(tx: OutboxTransaction) -> list[Any]:
            ids = [r["_id"] for r in records]
            seen = records_of.find({"_id": {"$in": ids}}, {"_id": 1}, session=tx.session)
            done = {d["_id"]["event_id"] for d in seen}
            fresh, fresh_records = [], []
            for message, record in zip(messages, records, strict=True):
                event_id = record["_id"]["event_id"]
                if event_id not in done:
                    done.add(event_id)  # a message twice in one batch runs once
                    fresh.append(message)
                    fresh_records.append(record)
            if fresh_records:
                records_of.insert_many(fresh_records, session=tx.session)
            for message in fresh:
                try:
                    handler(tx, message)
                except BaseException:
                    failed.append(message)
                    raise
            return fresh

        try:
            ran = self._transaction(body)
        except Exception as exc:
            self._after_failed_batch(messages, failed[-1:], handler, exc)
            return
        with self._stats_lock:
            self.stats.processed += len(ran)
            self.stats.duplicates += len(messages) - len(ran)
        for message in ran:
            self._after_commit(message)
        if len(ran) < len(messages) and log.isEnabledFor(logging.DEBUG):
            for message in set(messages).difference(ran):
                event = message.attributes.get(ATTR_EVENT_ID) or message.message_id
                log.debug("event %s already processed; acked", event)
        for message in messages:
            message.ack()

    def _after_failed_batch(
        self,
        messages: Sequence[Any],
        failed: list[Any],
        handler: Callable[[Any, Any], Any],
        exc: Exception,
    ) -> None:
        failed_keys: set[str] = set()
        for message in failed:
            event = message.attributes.get(ATTR_EVENT_ID) or message.message_id
            log.error(
                "handler failed on event %s; nacked, Pub/Sub will redeliver it",
                event,
                exc_info=exc,
                extra={"event_id": event},
            )
            self._count("failed")
            failed_keys.add(getattr(message, "ordering_key", ""))
            message.nack()
        callback = self._callback(handler)
        for message in messages:
            if message in failed:
                continue
            key = getattr(message, "ordering_key", "")
            if key and key in failed_keys:
                message.nack()  # its key's earlier message comes again first
            elif not callback(message):
                failed_keys.add(key)

    def _callback(self, handler: Callable[[OutboxTransaction, Any], Any]) -> Callable[[Any], bool]:
        def callback(message: Any) -> bool:
            """Process ``message`` and ack it; nack it when its handler fails (False)."""
            event = message.attributes.get(ATTR_EVENT_ID) or message.message_id
            try:
                ran = self.process(message, handler)
            except Exception:
                log.exception(
                    "handler failed on event %s; nacked, Pub/Sub will redeliver it",
                    event,
                    extra={"event_id": event},
                )
                message.nack()
                return False
            if ran:
                self._after_commit(message)
            else:
                log.debug("event %s already processed; acked", event)
            message.ack()
            return True

        return callback

    def ensure_collection(self, retention: _dt.timedelta | float | None = None) -> None:
        """Create the inbox collection (idempotent), and with ``retention`` a TTL index that
        deletes records that old (see :func:`~mongo_outbox.ensure_indexes`)."""
        if self._async:
            raise ConfigurationError(
                "ensure_collection needs a pymongo.MongoClient (run it once at deployment)"
            )
        sync: MongoClient[Any] = self.client
        db = sync[self.database]
        create_collection(db, self.collection)
        if retention is not None:
            set_retention(db[self.collection], "processed_at", retention)


#: ``handler(tx, message)``; or, typed, ``{EventClass: handler(tx, event, message)}`` or a
#: ``mongo_outbox.typed.Handlers``.
Handler = Callable[[Any, Any], Any] | Mapping[Any, Callable[..., Any]]


def _dispatch(inbox: Inbox, handler: Handler) -> Callable[[Any, Any], Any]:
    """The ``(tx, message)`` handler to run: typed handlers (``mongo_outbox.typed``, imported
    only then) parse each message into its event class first."""
    if isinstance(handler, Mapping):
        from .typed import Handlers

        handler = Handlers(handler)
    bind = getattr(handler, "_bind_inbox", None)
    if bind is not None:
        bound: Callable[[Any, Any], Any] = bind(inbox)
        return bound
    return handler


def _is_cancellation(exc: BaseException) -> bool:
    from concurrent.futures import CancelledError

    return isinstance(exc, CancelledError)
