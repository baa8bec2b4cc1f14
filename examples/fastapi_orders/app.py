"""An order service (FastAPI) and its billing consumer, with typed events end to end.

* ``POST /orders`` writes the order and its ``OrderPlaced`` event in one transaction.
* ``mongo-outbox relay`` publishes the events to Pub/Sub.
* The billing consumer (``run_billing``) processes each ``OrderPlaced`` once with a typed
  inbox, writes an invoice and emits ``InvoiceCreated`` in the same transaction.

Run it: ``MONGODB_URI=... uvicorn fastapi_orders.app:app`` (from ``examples/``), the relay,
and ``python -m fastapi_orders.app billing projects/<p>/subscriptions/<orders-billing>``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from events import InvoiceCreated, OrderPlaced
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from pymongo import MongoClient
from pymongo.errors import DuplicateKeyError

from mongo_outbox import Inbox, OutboxTransaction, outbox_transaction


class PlaceOrder(BaseModel):
    order_id: str = Field(min_length=1, max_length=100)
    total_cents: int = Field(gt=0)


def create_app(client: MongoClient[Any], database: str) -> FastAPI:
    """The order service on ``client`` (a replica set), writing to ``database``."""
    app = FastAPI(title="orders")

    @app.post("/orders", status_code=201)
    def place_order(body: PlaceOrder) -> dict[str, str]:
        # A plain def: FastAPI runs it in a thread, where PyMongo's blocking calls belong.
        try:
            with outbox_transaction(client, database=database) as tx:
                client[database].orders.insert_one(
                    {"_id": body.order_id, "total_cents": body.total_cents}, session=tx.session
                )
                event_id = tx.emit(OrderPlaced(**body.model_dump()))
        except DuplicateKeyError:
            raise HTTPException(409, f"order {body.order_id} exists") from None
        return {"order_id": body.order_id, "event_id": str(event_id)}

    return app


def billing_handlers(client: MongoClient[Any], database: str) -> dict[type, Any]:
    """The billing consumer's handlers, by event class."""

    def on_order_placed(tx: OutboxTransaction, event: OrderPlaced, message: Any) -> None:
        client[database].invoices.insert_one(
            {"_id": event.order_id, "amount_cents": event.total_cents}, session=tx.session
        )
        tx.emit(InvoiceCreated(order_id=event.order_id, amount_cents=event.total_cents))

    return {OrderPlaced: on_order_placed}


def run_billing(
    client: MongoClient[Any], database: str, subscription: str, stop: threading.Event
) -> None:
    """Consume ``subscription`` (to the orders topic) until ``stop`` is set."""
    inbox = Inbox(client, database=database, consumer="billing")
    inbox.subscribe(subscription, billing_handlers(client, database), stop=stop)


def _from_env() -> tuple[MongoClient[Any], str]:
    client: MongoClient[Any] = MongoClient(os.environ.get("MONGODB_URI", "mongodb://localhost"))
    return client, os.environ.get("SHOP_DATABASE", "shop")


if __name__ == "__main__" and sys.argv[1:2] == ["billing"]:
    run_billing(*_from_env(), sys.argv[2], threading.Event())
elif os.environ.get("MONGODB_URI"):
    app = create_app(*_from_env())
