"""Relay settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from .._errors import ConfigurationError
from .._formats import MessageFormat, message_format
from .._partition import SLOTS

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
    batch_size: int = 1000
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
    #: Most bytes (as BSON) of the events published together; at least one event goes.
    max_batch_bytes: int = 20_000_000
    #: Events, and bytes of them, queued between the change stream reader and the publisher.
    queue_size: int = 4000
    queue_bytes: int = 40_000_000
    #: Seconds a topic may keep failing transiently before it is isolated (its events wait,
    #: other topics go on).
    isolate_after: float = 30.0
    #: ``/healthz`` fails when the loop has made no progress (work MongoDB answered; none
    #: counts while the pipeline keeps failing) for this long.
    unhealthy_after: float = 60.0
    #: How often counts, oldest pending age and the oplog window are sampled.
    sample_interval: float = 15.0
    #: Shortest interval between two progress lines in the log.
    progress_interval: float = 10.0
    #: Seconds a relay's lease lasts without renewal; a standby takes over after it expires.
    lease_ttl: float = 15.0
    #: Lease owner id (default: host:pid:random).
    owner: str | None = None
    #: What a dead event does to its key: "release" lets later events of the key go on,
    #: "hold" keeps them pending until the dead event is requeued (or deleted).
    dead_key_policy: Literal["release", "hold"] = "release"
    #: Partitions of the outbox shared by a group of relays of this ``name`` (1: one relay
    #: publishes everything, the others wait as standbys). Every relay of a name must agree.
    partitions: int = 1
    #: "outbox" (attributes ``outbox_*``) or "cloudevents" (the CloudEvents Pub/Sub binding,
    #: binary mode), and the latter's ``ce-source`` (default
    #: ``mongo-outbox://<database>/<collection>``).
    message_format: Literal["outbox", "cloudevents"] = "outbox"
    cloudevents_source: str | None = None

    @cached_property
    def format(self) -> MessageFormat:
        """The message format, checked."""
        return message_format(
            self.message_format, self.cloudevents_source, self.database, self.collection
        )

    def __post_init__(self) -> None:
        if not self.database:
            raise ConfigurationError("database is required")
        if self.batch_size < 1 or self.batch_size > 10_000:
            raise ConfigurationError("batch_size must be between 1 and 10000")
        if self.max_batch_bytes < 1 or self.queue_bytes < 1:
            raise ConfigurationError("max_batch_bytes and queue_bytes must be positive")
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        if self.lease_ttl <= 0:
            raise ConfigurationError("lease_ttl must be positive")
        if not 1 <= self.partitions <= SLOTS:
            raise ConfigurationError(f"partitions must be between 1 and {SLOTS}")
        if self.dead_key_policy not in ("release", "hold"):
            raise ConfigurationError("dead_key_policy must be 'release' or 'hold'")
        self.format  # noqa: B018 (checks the source now, not at the first event)
