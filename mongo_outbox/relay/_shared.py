"""What every worker of one relay shares: the outbox, the publisher, the settings, the budgets."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .._store import OutboxStore
from ..publishers import Publisher
from ._budget import ByteBudget
from ._config import RelayConfig
from ._metrics import RelayMetrics

__all__ = ["Shared"]


@dataclass(frozen=True)
class Shared:
    """Built once by :class:`~mongo_outbox.relay.Relay`, handed down to its workers.

    A group member's partitions may all run at once: their stream queues share ``queue_budget``
    and their sweeps take ``sweep_turn`` in turn, so the member's memory is bounded like one
    relay's.
    """

    store: OutboxStore
    publisher: Publisher
    config: RelayConfig
    metrics: RelayMetrics
    #: Who holds the leases (one id per process, for every partition it works on).
    owner: str
    queue_budget: ByteBudget
    sweep_turn: threading.Lock
    #: Called when a dispatcher settled events (a beat of health, now and then a progress line).
    on_progress: Callable[[], None]
