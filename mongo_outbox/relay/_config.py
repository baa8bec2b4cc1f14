"""Relay settings."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RelayConfig"]


@dataclass(frozen=True)
class RelayConfig:
    """How a relay reads, batches, publishes and retries.

    ``database`` and ``collection`` name the outbox; ``name`` identifies the relay's checkpoint
    (one per outbox unless you shard by hand). Times are in seconds.
    """

    database: str
    collection: str = "outbox"
    name: str = "default"
    default_topic: str | None = None
    #: Most events published and marked together.
    batch_size: int = 500
    #: Longest a change stream getMore waits for new events (also how often the idle
    #: resume token advances).
    max_await_seconds: float = 1.0
    #: Resume tokens are saved at most this often (and on shutdown).
    checkpoint_interval: float = 1.0
    #: How often pending stragglers and due retries are swept.
    sweep_interval: float = 10.0
    #: A periodic sweep leaves events younger than this to the change stream.
    sweep_grace: float = 5.0
    #: Failed publish attempts (permanent errors) before an event becomes dead.
    max_attempts: int = 10
    #: Backoff between attempts of one event: initial delay and cap.
    retry_initial: float = 1.0
    retry_max: float = 300.0
    #: Backoff of transient publish errors and lost connections (retried without end).
    transient_initial: float = 0.2
    transient_max: float = 30.0
    #: Events queued between the change stream reader and the publisher.
    queue_size: int = 4000

    def __post_init__(self) -> None:
        if not self.database:
            raise ValueError("database is required")
        if self.batch_size < 1 or self.batch_size > 10_000:
            raise ValueError("batch_size must be between 1 and 10000")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
