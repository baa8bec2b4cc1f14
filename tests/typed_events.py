"""Event classes for the typed-event tests and the AsyncAPI document they pin."""

from __future__ import annotations

from pydantic import BaseModel

from mongo_outbox.typed import event


class Address(BaseModel):
    street: str
    city: str


@event("OrderPlaced", topic="orders", key="order_id")
class OrderPlaced(BaseModel):
    """An order was placed."""

    order_id: str
    total_cents: int


def shipment_key(shipped: OrderShipped) -> str:
    return f"order-{shipped.order_id}"


@event("OrderShipped", topic="orders", key=shipment_key)
class OrderShipped(BaseModel):
    """An order left the warehouse."""

    order_id: str
    to: Address


@event("Ping")
class Ping(BaseModel):
    n: int = 0
