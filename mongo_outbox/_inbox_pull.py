"""Batched consumption for the inbox: unary Pull, one transaction a batch, batched acks.

google-cloud-pubsub's streaming pull costs about 600 µs of CPU a message in its own machinery
(a future, a lease and histogram entries per message) and the inbox then ran one transaction a
message. Here a batch of messages is pulled in one request, processed in one transaction (their
records and their handlers' effects), and acknowledged in one request. When any handler of the
batch raises, the batch's transaction aborts and its messages are processed again one
transaction each, so a failing message never takes its neighbours' effects with it.

Messages are ``google.cloud.pubsub_v1.subscriber.message.Message`` objects, as the streaming
subscriber gives them; their ``ack()``/``nack()`` land in a :class:`_Requests` that this module
sends in batches.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud.pubsub_v1.subscriber.message import Message

__all__ = ["BatchSubscriber", "make_subscriber_client"]

log = logging.getLogger("mongo_outbox.inbox")

#: Seconds a pulled message stays ours by default; the lease keeper extends it while a batch
#: runs.
ACK_DEADLINE = 60
#: How often the messages in hand get their deadline extended (well within the shortest
#: deadline a subscription can have, 10 s).
EXTEND_EVERY = 3.0
#: Longest one Pull waits for messages (the emulator holds an empty pull for about 90 s).
PULL_WAIT = 1.0
#: Most ack ids in one Acknowledge or ModifyAckDeadline request (Pub/Sub allows 2,500; the
#: request is also bounded to 512 KB).
ACK_CHUNK = 2000


#: No limit of the channel's own: Pub/Sub messages reach 10 MB, a Pull response more.
_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def make_subscriber_client() -> Any:
    """A ``SubscriberClient`` whose channel carries the largest messages, also to the
    emulator (``PUBSUB_EMULATOR_HOST``), where google-cloud-pubsub's own channel stops at
    gRPC's default 4 MiB."""
    from google.cloud import pubsub_v1

    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return pubsub_v1.SubscriberClient()  # its channel has no limit of its own
    import grpc
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    channel = grpc.insecure_channel(host, options=_UNLIMITED)
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


class _Requests:
    """Where ``Message.ack()``/``nack()`` put their requests: sorted into ack and nack ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acks: list[str] = []
        self.nacks: list[str] = []

    def put(self, request: Any, *args: Any, **kwargs: Any) -> None:
        kind = type(request).__name__
        with self._lock:
            if kind == "AckRequest":
                self.acks.append(request.ack_id)
            elif kind == "NackRequest" or (kind == "ModAckRequest" and request.seconds == 0):
                self.nacks.append(request.ack_id)

    def take(self) -> tuple[list[str], list[str]]:
        with self._lock:
            acks, nacks = self.acks, self.nacks
            self.acks, self.nacks = [], []
        return acks, nacks


class BatchSubscriber:
    """Pulls ``subscription`` in batches and hands each batch to ``process`` until ``stop``.

    ``process(messages)`` settles every message it is given (acks or nacks it) before it
    returns. ``max_messages`` bounds a batch by count, ``max_bytes`` by the bytes of the
    messages in hand (the next pull asks for fewer messages when the last ones were big, and
    always for at least one).
    """

    def __init__(
        self,
        client: Any,
        subscription: str,
        process: Callable[[Sequence[Message]], None],
        *,
        max_messages: int,
        max_bytes: int,
        ack_deadline: int = 60,
    ) -> None:
        self._client = client
        # Pub/Sub takes 10 to 600 s; it is also how long a crashed consumer's batch waits.
        self._ack_deadline = max(10, min(600, ack_deadline))
        self._subscription = subscription
        self._process = process
        self._max_messages = max(1, min(max_messages, 1000))
        self._max_bytes = max(1, max_bytes)
        self._requests = _Requests()
        self._in_hand: list[str] = []
        self._in_hand_lock = threading.Lock()
        self._mean_size = 0.0

    def run(self, stop: threading.Event) -> None:
        """Pull, process, settle, until ``stop`` is set (the batch in hand is finished)."""
        done = threading.Event()
        keeper = threading.Thread(
            target=self._keep_leases, args=(done,), name="inbox-leases", daemon=True
        )
        keeper.start()
        try:
            while not stop.is_set():
                messages = self._pull()
                if not messages:
                    continue
                with self._in_hand_lock:
                    self._in_hand = [m.ack_id for m in messages]
                try:
                    self._process(messages)
                finally:
                    with self._in_hand_lock:
                        self._in_hand = []
                    self._settle()
        finally:
            done.set()
            keeper.join(timeout=5)

    def _batch_size(self) -> int:
        if self._mean_size <= 0:
            return self._max_messages
        return max(1, min(self._max_messages, int(self._max_bytes // self._mean_size)))

    def _pull(self) -> list[Message]:
        try:
            response = self._client.pull(
                request={"subscription": self._subscription, "max_messages": self._batch_size()},
                timeout=PULL_WAIT,
            )
        except (gexc.DeadlineExceeded, gexc.ServiceUnavailable, gexc.InternalServerError):
            return []  # nothing came (or a passing fault): pull again
        except gexc.ResourceExhausted as exc:
            if "larger than max" in str(exc):
                # A message bigger than the channel's receive limit can never arrive on it.
                log.error(
                    "a message of %s is larger than the gRPC channel accepts (%s): give the "
                    "subscriber a channel with grpc.max_receive_message_length -1 (Pub/Sub "
                    "messages reach 10 MB); pulling one message at a time meanwhile",
                    self._subscription,
                    exc,
                )
                self._mean_size = float(self._max_bytes)
                time.sleep(PULL_WAIT)
                return []
            raise
        received = response.received_messages
        if not received:
            return []
        requests = self._requests
        messages = [
            Message(r.message._pb, r.ack_id, r.delivery_attempt, requests) for r in received
        ]
        size = sum(m.size for m in messages) / len(messages)
        self._mean_size = size if self._mean_size <= 0 else 0.5 * (self._mean_size + size)
        return messages

    def _settle(self) -> None:
        acks, nacks = self._requests.take()
        subscription = self._subscription
        for chunk in _chunks(acks):
            try:
                self._client.acknowledge(request={"subscription": subscription, "ack_ids": chunk})
            except gexc.GoogleAPICallError as exc:
                # Committed already: a redelivery is recognised as a duplicate and acked then.
                log.warning(
                    "acknowledging %d messages failed (%s); they come again", len(chunk), exc
                )
        for chunk in _chunks(nacks):
            self._modify(chunk, 0)

    def _modify(self, ack_ids: list[str], seconds: int) -> None:
        try:
            self._client.modify_ack_deadline(
                request={
                    "subscription": self._subscription,
                    "ack_ids": ack_ids,
                    "ack_deadline_seconds": seconds,
                }
            )
        except gexc.GoogleAPICallError as exc:
            log.warning("changing the deadline of %d messages failed: %s", len(ack_ids), exc)

    def _keep_leases(self, done: threading.Event) -> None:
        """Extend the deadline of the messages in hand while a batch runs long."""
        while not done.wait(EXTEND_EVERY):
            with self._in_hand_lock:
                in_hand = list(self._in_hand)
            for chunk in _chunks(in_hand):
                self._modify(chunk, self._ack_deadline)


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), ACK_CHUNK):
        yield ids[start : start + ACK_CHUNK]
