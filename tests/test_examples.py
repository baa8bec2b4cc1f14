"""The examples under examples/ on the real replica set (and the emulator): ODM recipes commit
and abort together with their events; the FastAPI order service runs the whole typed flow."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from events import InvoiceCreated, OrderPlaced  # noqa: E402


def _state(client, db_name) -> tuple[list[str], list[tuple[str, str]]]:
    orders = sorted(d.get("order_id", d["_id"]) for d in client[db_name].orders.find())
    events = sorted(
        (e["type"], OrderPlaced.model_validate_json(e["payload"]).order_id)
        for e in client[db_name].outbox.find()
    )
    return orders, events


def test_beanie_orders_commit_and_abort_with_their_events(mongodb_uri, client, db_name):
    import beanie_orders
    from pymongo import AsyncMongoClient

    async def main() -> None:
        aclient: Any = AsyncMongoClient(mongodb_uri)
        try:
            await beanie_orders.setup(aclient, db_name)
            await beanie_orders.place_order(aclient, db_name, "o-1", 100)
            with pytest.raises(RuntimeError, match="declined"):
                await beanie_orders.place_order(aclient, db_name, "o-2", 200, fail=True)
            with pytest.raises(RuntimeError, match="declined"):
                await beanie_orders.place_order_by_mistake(aclient, db_name, "o-3")
        finally:
            await aclient.close()

    asyncio.run(main())
    orders, events = _state(client, db_name)
    # o-2 aborted with its event; o-3 was written outside the transaction: it stays, eventless.
    assert orders == ["o-1", "o-3"]
    assert events == [("OrderPlaced", "o-1")]


def test_odmantic_orders_commit_and_abort_with_their_events(mongodb_uri, client, db_name):
    import odmantic_orders
    from motor.motor_asyncio import AsyncIOMotorClient
    from odmantic import AIOEngine

    async def main() -> None:
        aclient: Any = AsyncIOMotorClient(mongodb_uri)
        try:
            engine = AIOEngine(client=aclient, database=db_name)
            await odmantic_orders.place_order(engine, "o-1", 100)
            with pytest.raises(RuntimeError, match="declined"):
                await odmantic_orders.place_order(engine, "o-2", 200, fail=True)
            with pytest.raises(RuntimeError, match="declined"):
                await odmantic_orders.place_order_by_mistake(engine, "o-3")
        finally:
            aclient.close()

    asyncio.run(main())
    orders, events = _state(client, db_name)
    assert orders == ["o-1", "o-3"]
    assert events == [("OrderPlaced", "o-1")]


def test_the_fastapi_order_service_end_to_end(client, db_name, pubsub, relay_factory):
    from fastapi.testclient import TestClient
    from fastapi_orders.app import create_app, run_billing

    pubsub.topic("orders")
    _, billing_sub = pubsub.topic_subscription("orders")
    _, invoices_sub = pubsub.topic("invoices")
    relay_factory(db_name)

    with TestClient(create_app(client, db_name)) as http:
        created = http.post("/orders", json={"order_id": "o-1", "total_cents": 1250})
        assert created.status_code == 201, created.text
        assert http.post("/orders", json={"order_id": "o-1", "total_cents": 1}).status_code == 409
        assert http.post("/orders", json={"order_id": "o-2", "total_cents": -5}).status_code == 422
    event_id = created.json()["event_id"]
    assert client[db_name].outbox.count_documents({}) == 1  # the refused requests left none

    stop = threading.Event()
    billing = threading.Thread(
        target=run_billing, args=(client, db_name, billing_sub.path, stop), daemon=True
    )
    billing.start()
    try:
        wait_for(lambda: client[db_name].invoices.count_documents({}) == 1, timeout=60)
        # The chained event reaches the invoices topic through the same relay.
        [message] = invoices_sub.pull_until(1)
    finally:
        stop.set()
        billing.join(60)
    assert client[db_name].invoices.find_one() == {"_id": "o-1", "amount_cents": 1250}
    record = client[db_name].inbox.find_one()
    assert record["_id"] == {"consumer": "billing", "event_id": event_id}
    assert message.attributes["outbox_event_type"] == "InvoiceCreated"
    assert InvoiceCreated.model_validate_json(message.data) == InvoiceCreated(
        order_id="o-1", amount_cents=1250
    )
