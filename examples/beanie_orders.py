"""Beanie 2 (on PyMongo's AsyncMongoClient): an order document and its event in one transaction.

Beanie runs every operation in the session it is given, so open the session and the
transaction yourself, pass ``session=`` to Beanie, and add the event with ``emit_in``: both
commit, or neither does.
"""

from __future__ import annotations

from beanie import Document, init_beanie
from events import OrderPlaced
from pymongo import AsyncMongoClient

from mongo_outbox import emit_in


class Order(Document):
    order_id: str
    total_cents: int

    class Settings:
        name = "orders"


async def setup(client: AsyncMongoClient, database: str) -> None:  # type: ignore[type-arg]
    await init_beanie(database=client[database], document_models=[Order])


async def place_order(
    client: AsyncMongoClient,  # type: ignore[type-arg]
    database: str,
    order_id: str,
    total_cents: int,
    *,
    fail: bool = False,
) -> None:
    async with client.start_session() as session, await session.start_transaction():
        await Order(order_id=order_id, total_cents=total_cents).insert(session=session)
        await emit_in(
            session, OrderPlaced(order_id=order_id, total_cents=total_cents), database=database
        )
        if fail:  # anything raised here aborts the order and its event together
            raise RuntimeError("payment declined")


async def place_order_by_mistake(
    client: AsyncMongoClient,  # type: ignore[type-arg]
    database: str,
    order_id: str,
) -> None:
    """The pitfall: ``insert()`` without ``session=`` writes outside the transaction, so it
    stays when the transaction aborts, and its event does not."""
    async with client.start_session() as session, await session.start_transaction():
        await Order(order_id=order_id, total_cents=1).insert()  # no session: not in it
        await emit_in(session, OrderPlaced(order_id=order_id, total_cents=1), database=database)
        raise RuntimeError("payment declined")
