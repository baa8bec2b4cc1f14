"""ODMantic (on Motor): an order and its event in the engine's transaction.

``engine.transaction()`` owns the transaction; save through it and hand its driver session to
``emit_in``: the event commits with the order, or neither does.
"""

from __future__ import annotations

from events import OrderPlaced
from odmantic import AIOEngine, Model
from odmantic.config import ODMConfigDict

from mongo_outbox import emit_in


class Order(Model):
    order_id: str
    total_cents: int

    model_config = ODMConfigDict(collection="orders")


async def place_order(
    engine: AIOEngine, order_id: str, total_cents: int, *, fail: bool = False
) -> None:
    async with engine.transaction() as transaction:
        await transaction.save(Order(order_id=order_id, total_cents=total_cents))
        await emit_in(
            transaction.get_driver_session(),
            OrderPlaced(order_id=order_id, total_cents=total_cents),
            database=engine.database_name,
        )
        if fail:  # anything raised here aborts the order and its event together
            raise RuntimeError("payment declined")


async def place_order_by_mistake(engine: AIOEngine, order_id: str) -> None:
    """The pitfall: ``engine.save`` (not ``transaction.save``) writes outside the transaction,
    so the order stays when it aborts, and its event does not."""
    async with engine.transaction() as transaction:
        await engine.save(Order(order_id=order_id, total_cents=1))  # not in the transaction
        await emit_in(
            transaction.get_driver_session(),
            OrderPlaced(order_id=order_id, total_cents=1),
            database=engine.database_name,
        )
        raise RuntimeError("payment declined")
