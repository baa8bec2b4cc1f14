"""Typed events on a real mongod (and the emulator): pydantic models in with ``tx.emit`` and
``emit_in``, out through inbox handlers by event class, and the rules on misuse."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from bson import ObjectId
from helpers import wait_for
from motor.motor_asyncio import AsyncIOMotorClient
from pydantic import BaseModel
from pymongo import AsyncMongoClient
from typed_events import Address, OrderPlaced, OrderShipped, Ping

from mongo_outbox import (
    ConfigurationError,
    Inbox,
    OutboxError,
    ValidationError,
    emit_in,
    outbox_transaction,
)
from mongo_outbox._formats import OUTBOX, MessageFormat
from mongo_outbox._message import message_from_document
from mongo_outbox.typed import Handlers, RejectedMessage, event

CLOUDEVENTS = MessageFormat("//shop.example.com/orders")


def test_the_core_imports_no_pydantic():
    code = "import sys, mongo_outbox, mongo_outbox.cli; print('pydantic' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# -- declaring ---------------------------------------------------------------------------------


def test_a_key_field_the_model_lacks_is_refused_at_once():
    with pytest.raises(
        ConfigurationError, match=r"key field 'order', which Bad lacks \(its fields: order_id\)"
    ):

        @event("Bad", key="order")
        class Bad(BaseModel):
            order_id: str


@pytest.mark.parametrize(
    ("args", "error"),
    [(("",), ValidationError), (("Ok",), ConfigurationError), (("Ok", "x"), ValidationError)],
)
def test_bad_declarations_are_refused(args, error):
    with pytest.raises(error):
        event(args[0], topic=args[1] if len(args) > 1 else None)(dict)  # type: ignore[arg-type]


# -- emitting ----------------------------------------------------------------------------------


def test_emit_takes_type_topic_key_and_payload_from_the_model(client, db_name):
    placed = OrderPlaced(order_id="o-1", total_cents=1200)
    shipped = OrderShipped(order_id="o-1", to=Address(street="1 Main St", city="Åre"))
    with outbox_transaction(client, database=db_name) as tx:
        first = tx.emit(placed, attributes={"tenant": "acme"})
        second = tx.emit(shipped)
        third = tx.emit(Ping())
    docs = {d["_id"]: d for d in client[db_name].outbox.find()}
    doc = docs[first]
    assert (doc["type"], doc["topic"], doc["key"]) == ("OrderPlaced", "orders", "o-1")
    assert doc["content_type"] == "application/json"
    assert doc["attributes"] == {"tenant": "acme"}
    assert OrderPlaced.model_validate_json(doc["payload"]) == placed
    assert (docs[second]["type"], docs[second]["key"]) == ("OrderShipped", "order-o-1")
    assert json.loads(docs[second]["payload"])["to"]["city"] == "Åre"
    assert (docs[third]["topic"], docs[third]["key"]) == (None, None)


class NotDeclared(BaseModel):
    x: int = 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda tx: tx.emit(NotDeclared()), r"cannot emit a NotDeclared: .*@mongo_outbox\.typed"),
        (lambda tx: tx.emit(Ping(), {"n": 1}), r"takes no a payload: the model is its own"),
        (lambda tx: tx.emit(Ping(), topic="other"), r"takes no topic="),
        (lambda tx: tx.emit(Ping(), key="k"), r"takes no key="),
        (
            lambda tx: tx.emit(OrderPlaced(order_id="x" * 1025, total_cents=1)),
            r"ordering key",
        ),
        (
            lambda tx: tx.emit(OrderPlaced(order_id="o", total_cents=1), {"big": "x"}),
            r"takes no a payload",
        ),
    ],
)
def test_misuse_raises_at_once_and_nothing_commits(client, db_name, call, match):
    with pytest.raises(ValidationError, match=match):
        with outbox_transaction(client, database=db_name) as tx:
            tx.emit(Ping())
            call(tx)
    assert client[db_name].outbox.count_documents({}) == 0


def test_a_subclass_of_an_event_class_is_not_that_event(client, db_name):
    class Special(OrderPlaced):
        extra: int = 0

    with outbox_transaction(client, database=db_name) as tx, pytest.raises(ValidationError):
        tx.emit(Special(order_id="o", total_cents=1))


def test_a_model_past_pubsubs_limit_is_refused_before_commit(client, db_name):
    @event("Blob", topic="blobs")
    class Blob(BaseModel):
        body: str

    with pytest.raises(ValidationError, match=r"10,000,000 bytes"):
        with outbox_transaction(client, database=db_name) as tx:
            tx.emit(Blob(body="x" * 10_000_000))
    assert client[db_name].outbox.count_documents({}) == 0


def test_a_key_function_returning_none_is_refused(client, db_name):
    @event("Keyless", key=lambda m: None)
    class Keyless(BaseModel):
        pass

    with outbox_transaction(client, database=db_name) as tx:
        with pytest.raises(ValidationError, match="key function returned None"):
            tx.emit(Keyless())


# -- emit_in -----------------------------------------------------------------------------------


def test_emit_in_commits_and_aborts_with_the_sessions_transaction(client, db_name):
    with client.start_session() as session:
        with session.start_transaction():
            client[db_name].orders.insert_one({"_id": "o-1"}, session=session)
            event_id = emit_in(
                session, OrderPlaced(order_id="o-1", total_cents=5), database=db_name
            )
            assert isinstance(event_id, ObjectId)
            assert client[db_name].outbox.count_documents({}) == 0  # not committed yet
        session.start_transaction()
        client[db_name].orders.insert_one({"_id": "o-2"}, session=session)
        emit_in(session, "OrderPlaced", {"id": 2}, database=db_name, topic="orders", key="o-2")
        session.abort_transaction()
    assert [d["_id"] for d in client[db_name].orders.find()] == ["o-1"]
    [doc] = client[db_name].outbox.find()
    assert (doc["_id"], doc["type"], doc["key"]) == (event_id, "OrderPlaced", "o-1")


def test_emit_in_refuses_a_session_outside_a_transaction(client, db_name):
    with client.start_session() as session:
        with pytest.raises(OutboxError, match="needs a session in a transaction"):
            emit_in(session, "E", {"a": 1}, database=db_name)
    with pytest.raises(OutboxError, match="needs a PyMongo or Motor client session"):
        emit_in(object(), "E", {"a": 1}, database=db_name)
    assert client[db_name].outbox.count_documents({}) == 0


def test_emit_in_validates_before_writing(client, db_name):
    with client.start_session() as session, session.start_transaction():
        with pytest.raises(ValidationError, match="takes no topic="):
            emit_in(session, Ping(), database=db_name, topic="x")


@pytest.mark.parametrize("driver", ["pymongo", "motor"])
def test_emit_in_awaits_with_an_async_session(mongodb_uri, client, db_name, driver):
    async def main() -> ObjectId:
        aclient: Any = (
            AsyncMongoClient(mongodb_uri)
            if driver == "pymongo"
            else AsyncIOMotorClient(mongodb_uri)
        )
        try:
            session = aclient.start_session()
            session = await session if asyncio.iscoroutine(session) else session
            try:
                start = session.start_transaction()
                if asyncio.iscoroutine(start):
                    await start
                await aclient[db_name].orders.insert_one({"_id": "o-1"}, session=session)
                event_id = await emit_in(session, Ping(n=3), database=db_name)
                await session.commit_transaction()
                return event_id
            finally:
                end = session.end_session()
                if asyncio.iscoroutine(end):
                    await end
        finally:
            close = aclient.close()
            if asyncio.iscoroutine(close):
                await close

    event_id = asyncio.run(main())
    doc = client[db_name].outbox.find_one({"_id": event_id})
    assert Ping.model_validate_json(doc["payload"]) == Ping(n=3)


# -- consuming ---------------------------------------------------------------------------------


def _published(client, db_name, model_or_doc: Any, fmt: MessageFormat = OUTBOX) -> Any:
    """Emit ``model_or_doc`` (a model, or (type, payload)) and return the message the relay
    would publish in ``fmt``, as a subscriber sees it."""
    with outbox_transaction(client, database=db_name) as tx:
        if isinstance(model_or_doc, BaseModel):
            event_id = tx.emit(model_or_doc)
        else:
            event_id = tx.emit(*model_or_doc, topic="orders")
    message = message_from_document(client[db_name].outbox.find_one({"_id": event_id}), fmt=fmt)
    return SimpleNamespace(
        message_id=f"m-{event_id}",
        attributes=dict(message.attributes),
        data=message.data,
        ordering_key=message.ordering_key or "",
    )


@pytest.fixture
def inbox(client, db_name) -> Inbox:
    return Inbox(client, database=db_name, consumer="billing")


@pytest.mark.parametrize("fmt", [OUTBOX, CLOUDEVENTS], ids=["outbox", "cloudevents"])
def test_handlers_by_class_get_the_model_that_was_emitted(client, db_name, inbox, fmt):
    placed = OrderPlaced(order_id="o-7", total_cents=990)
    shipped = OrderShipped(order_id="o-7", to=Address(street="s", city="c"))
    seen: list[Any] = []

    def on_placed(tx, event, message):
        seen.append(event)
        tx.emit(Ping(n=event.total_cents))  # chained, in the same transaction

    handlers = {OrderPlaced: on_placed, OrderShipped: lambda tx, e, m: seen.append(e)}
    assert inbox.process(_published(client, db_name, placed, fmt), handlers) is True
    assert inbox.process(_published(client, db_name, shipped, fmt), handlers) is True
    assert seen == [placed, shipped]
    assert type(seen[0]) is OrderPlaced
    chained = client[db_name].outbox.find_one({"type": "Ping"})
    assert json.loads(chained["payload"]) == {"n": 990}


@pytest.mark.parametrize(
    ("emitted", "reason"),
    [
        (("OrderPlaced", {"order_id": "o-1", "total_cents": "lots"}), r"total_cents: Input"),
        (("OrderPlaced", b"not json"), r"payload is not a valid OrderPlaced: \(payload\)"),
        (("Refunded", {"id": 1}), r"no handler for this event type"),
    ],
)
def test_a_rejected_message_is_recorded_and_acked_by_default(
    client, db_name, inbox, emitted, reason, caplog
):
    ran = []
    message = _published(client, db_name, emitted)
    assert inbox.process(message, {OrderPlaced: lambda *a: ran.append(a)}) is True
    assert ran == []
    record = client[db_name].inbox.find_one()
    assert record["rejected"]["data"] == message.data
    assert re.search(reason, record["rejected"]["reason"]), record["rejected"]["reason"]
    event_id = message.attributes["outbox_event_id"]
    assert any(event_id in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)
    # A redelivery is a duplicate: still no handler.
    assert inbox.process(message, {OrderPlaced: lambda *a: ran.append(a)}) is False
    assert ran == []


def test_the_nack_policy_raises_and_commits_nothing(client, db_name, inbox):
    message = _published(client, db_name, ("OrderPlaced", {"order_id": 1}))
    handlers = Handlers({OrderPlaced: lambda *a: None}, on_invalid="nack")
    with pytest.raises(RejectedMessage, match="payload is not a valid OrderPlaced"):
        inbox.process(message, handlers)
    assert client[db_name].inbox.count_documents({}) == 0
    assert inbox.stats.failed == 1


def test_handler_mappings_are_checked_when_given(inbox):
    with pytest.raises(ConfigurationError, match="not declared with @mongo_outbox"):
        Handlers({NotDeclared: lambda *a: None})
    with pytest.raises(ConfigurationError, match="on_invalid"):
        Handlers({}, on_invalid="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="through an Inbox"):
        Handlers({})(None, None)


def test_an_async_inbox_runs_async_typed_handlers(mongodb_uri, client, db_name):
    placed = OrderPlaced(order_id="o-9", total_cents=1)
    good = _published(client, db_name, placed)
    bad = _published(client, db_name, ("OrderPlaced", {"x": 1}))
    seen: list[Any] = []

    async def handle(tx, event, message):
        seen.append(event)
        tx.emit(Ping(n=9))

    async def main() -> tuple[bool, bool]:
        aclient: Any = AsyncMongoClient(mongodb_uri)
        try:
            box = Inbox(aclient, database=db_name, consumer="async")
            return (
                await box.process(good, {OrderPlaced: handle}),
                await box.process(bad, {OrderPlaced: handle}),
            )
        finally:
            await aclient.close()

    assert asyncio.run(main()) == (True, True)
    assert seen == [placed]
    assert "rejected" in client[db_name].inbox.find_one(
        {"_id.event_id": bad.attributes["outbox_event_id"]}
    )
    assert client[db_name].outbox.count_documents({"type": "Ping"}) == 1


@pytest.mark.parametrize("message_format", ["outbox", "cloudevents"])
def test_typed_round_trip_through_the_relay_and_the_emulator(
    client, db_name, pubsub, relay_factory, message_format
):
    """Models in, the same models out of a subscribed inbox; an invalid payload and an unknown
    type are recorded and acked without blocking the others."""
    topic, sub = pubsub.topic()
    relay_factory(db_name, default_topic=topic, message_format=message_format)

    @event("OrderPlaced", topic=topic, key="order_id")
    class Placed(BaseModel):
        order_id: str
        total_cents: int

    @event("Pinged", key="n")
    class Pinged(BaseModel):
        n: int

    sent = [Placed(order_id=f"o-{i}", total_cents=i) for i in range(5)]
    with outbox_transaction(client, database=db_name) as tx:
        tx.emit(sent[0])
        tx.emit("OrderPlaced", {"order_id": "bad"}, topic=topic)
        tx.emit("Unknown", {"x": 1}, topic=topic)
        for model in sent[1:]:
            tx.emit(model)
        tx.emit(Pinged(n=1))  # no topic: the relay's default

    def handle(tx, event, message):  # the effect commits with the inbox record: once
        effect = {"class": type(event).__name__, "event": event.model_dump()}
        client[db_name].effects.insert_one(effect, session=tx.session)

    inbox = Inbox(client, database=db_name, consumer="typed")
    inbox.ensure_collection()
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            inbox.subscribe(sub.path, {Placed: handle, Pinged: handle}, stop=stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: client[db_name].inbox.count_documents({}) == 8, timeout=60)
    finally:
        stop.set()
        thread.join(60)
    assert errors == []
    received = [
        (Placed if e["class"] == "Placed" else Pinged).model_validate(e["event"])
        for e in client[db_name].effects.find()
    ]
    assert sorted((m for m in received if isinstance(m, Placed)), key=str) == sent
    assert [m for m in received if isinstance(m, Pinged)] == [Pinged(n=1)]
    rejected = list(client[db_name].inbox.find({"rejected": {"$exists": True}}))
    assert sorted(r["type"] for r in rejected) == ["OrderPlaced", "Unknown"]
