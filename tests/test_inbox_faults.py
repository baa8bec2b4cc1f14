"""The inbox under kill -9: consumer processes die between commit and ack, mid-stream.

Figures are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from faults import report
from helpers import wait_for

from mongo_outbox import Inbox, ensure_indexes, outbox_transaction
from mongo_outbox.testing import EmulatorSubscription

pytestmark = pytest.mark.slow

CONSUMER = Path(__file__).with_name("inbox_consumer.py")


class ConsumerProcess:
    """``inbox_consumer.py`` in its own process, its output kept in a file."""

    def __init__(self, uri: str, db: str, subscription: str, **settings: str) -> None:
        env = dict(os.environ)
        env.update(
            MONGODB_URI=uri,
            CONSUMER_DB=db,
            CONSUMER_NAME=settings.pop("name", "service-b"),
            CONSUMER_SUBSCRIPTION=subscription,
            **settings,
        )
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            "w+", prefix="consumer-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(CONSUMER)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def close(self) -> None:
        self.kill()
        self.log.close()
        os.unlink(self.log.name)


# The emulator never redelivers, on an *ordered* subscription, a message that was outstanding
# on a streaming pull whose process was killed (its key stays blocked; seen for 180 s), where
# the real service redelivers it after the ack deadline. The kill tests therefore use unordered
# subscriptions; order is tested without kills (test_inbox.py).


def test_killed_between_commit_and_ack_the_redelivery_does_not_repeat_the_effect(
    client, db_name, pubsub_emulator_host, pubsub_project, mongodb_uri
):
    unordered = EmulatorSubscription(pubsub_project, ordered=False)
    sent = [unordered.publish(b"{}", key=f"k{i % 4}") for i in range(20)]
    first = ConsumerProcess(mongodb_uri, db_name, unordered.path, CONSUMER_DIE_AFTER_COMMITS="5")
    second = None
    try:
        assert first.wait(timeout=120) == -signal.SIGKILL  # it killed itself after a commit
        committed = client[db_name].inbox.count_documents({})
        assert committed >= 5
        second = ConsumerProcess(mongodb_uri, db_name, unordered.path)
        wait_for(lambda: client[db_name].effects.count_documents({}) >= 20, timeout=180)
        # The messages committed but never acked come back and are acked as duplicates.
        wait_for(lambda: "already processed" in second.output(), timeout=180, interval=0.5)
        assert second.terminate() == 0
        duplicates = second.output().count("already processed")
    finally:
        first.close()
        if second is not None:
            second.close()
        unordered.close()
    effects = list(client[db_name].effects.find())
    assert sorted(e["event"] for e in effects) == sorted(sent)  # each effect exactly once
    report(
        "consumer kill -9 after commit",
        messages=20,
        committed_before_kill=committed,
        redelivered_duplicates=duplicates,
        effects=len(effects),
    )


@pytest.mark.timeout(600)
def test_a_chain_of_three_services_has_exactly_one_effect_per_event(
    client, pubsub_emulator_host, pubsub_project, relay_factory, mongodb_uri
):
    """A emits 1,000 events; B consumes them through an inbox and emits one event each in the
    same transaction (killed twice mid-stream); a relay publishes B's events; C's inbox
    receives exactly 1,000 distinct effects."""
    dbs = {name: f"chain_{name}_{uuid.uuid4().hex[:8]}" for name in "abc"}
    orders = EmulatorSubscription(pubsub_project, "orders", ordered=False)
    billing = EmulatorSubscription(pubsub_project, "billing", ordered=False)
    for db in dbs.values():
        ensure_indexes(client, db)
    relay_factory(dbs["a"], default_topic=orders.topic)
    relay_factory(dbs["b"])
    consumers: list[ConsumerProcess] = []
    stop_c = threading.Event()
    inbox_c = Inbox(client, database=dbs["c"], consumer="service-c")

    def effect_in_c(tx: Any, message: Any) -> None:
        source = message.attributes["source_event"]
        client[dbs["c"]].effects.insert_one({"source": source}, session=tx.session)

    c_thread = threading.Thread(
        target=inbox_c.subscribe, args=(billing.path, effect_in_c), kwargs={"stop": stop_c}
    )
    c_thread.start()
    sent: dict[str, list[str]] = {}
    kills = 0
    try:
        settings = {"CONSUMER_FORWARD_TOPIC": billing.topic}
        consumers.append(ConsumerProcess(mongodb_uri, dbs["b"], orders.path, **settings))
        for start in range(0, 1000, 20):
            with outbox_transaction(client, database=dbs["a"]) as tx:
                for i in range(start, start + 20):
                    key = f"order-{i % 25}"
                    sent.setdefault(key, []).append(str(tx.emit("OrderPlaced", {"i": i}, key=key)))
        for threshold in (300, 600):  # B dies twice mid-stream
            wait_for(
                lambda t=threshold: client[dbs["b"]].inbox.count_documents({}) >= t,
                timeout=180,
                interval=0.1,
            )
            consumers[-1].kill()
            kills += 1
            consumers.append(ConsumerProcess(mongodb_uri, dbs["b"], orders.path, **settings))
        started = time.monotonic()
        wait_for(
            lambda: client[dbs["c"]].effects.count_documents({}) >= 1000, timeout=300, interval=0.5
        )
        tail = time.monotonic() - started
        assert consumers[-1].terminate() == 0
    finally:
        stop_c.set()
        c_thread.join(60)
        for consumer in consumers:
            consumer.close()
        orders.close()
        billing.close()
    b_effects = list(client[dbs["b"]].effects.find())
    c_sources = [e["source"] for e in client[dbs["c"]].effects.find()]
    b_outbox = client[dbs["b"]].outbox.count_documents({})
    all_sent = sorted(i for ids in sent.values() for i in ids)
    for db in dbs.values():
        client.drop_database(db)
    assert sorted(e["event"] for e in b_effects) == all_sent  # B: each once
    assert b_outbox == 1000  # B emitted exactly one event per input, atomically
    assert sorted(c_sources) == all_sent  # C: 1,000 distinct effects, none twice
    report(
        "chain A -> B -> C",
        events=1000,
        b_kills=kills,
        b_effects=len(b_effects),
        c_effects=len(c_sources),
        after_last_kill_s=round(tail, 1),
    )
