"""The events the examples emit and consume."""

from __future__ import annotations

from pydantic import BaseModel

from mongo_outbox.typed import event


@event("OrderPlaced", topic="orders", key="order_id")
class OrderPlaced(BaseModel):
    """A customer placed an order."""

    order_id: str
    total_cents: int


@event("InvoiceCreated", topic="invoices", key="order_id")
class InvoiceCreated(BaseModel):
    """Billing invoiced an order."""

    order_id: str
    amount_cents: int
