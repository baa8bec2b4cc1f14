"""Memory is bounded by bytes: a relay process draining 9 MB events stays under 600 MB.

Real relay processes, real mongod, real emulator. The topic has no subscription, so the
emulator does not keep 1.35 GB of messages; what reached it is read from the outbox.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from faults import RelayProcess, relay_env
from helpers import wait_for

from mongo_outbox import outbox_transaction
from mongo_outbox._admin import OutboxAdmin

pytestmark = pytest.mark.slow

EVENTS = 150
EVENT_BYTES = 9_000_000
LIMIT_MB = 600


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _write_big_events(client: Any, db: str, count: int) -> None:
    payload = b"x" * EVENT_BYTES
    for i in range(count):
        with outbox_transaction(client, database=db) as tx:
            tx.emit("Big", payload, key=f"k{i % 4}")


def _topic(pubsub: Any) -> str:
    name = f"big-{time.monotonic_ns()}"
    pubsub.publisher_client.create_topic(
        name=pubsub.publisher_client.topic_path(pubsub.project, name)
    )
    return name


def test_draining_big_events_with_once_stays_under_the_byte_budget(
    client, db_name, pubsub, mongodb_uri
):
    _write_big_events(client, db_name, EVENTS)
    relay = RelayProcess(
        relay_env(mongodb_uri, db_name, pubsub.project, _topic(pubsub)), ["--once"]
    )
    peak = 0.0
    try:
        while relay.alive():
            try:
                peak = max(peak, _peak_rss_mb(relay.proc.pid))
            except (FileNotFoundError, ProcessLookupError, AssertionError):
                break  # exited between the check and the read
            time.sleep(0.05)  # sampling interval of the peak, not synchronisation
        assert relay.proc.wait(timeout=300) == 0, relay.output()
    finally:
        relay.close()
    counts = OutboxAdmin(client[db_name]).counts()
    print(f"\n[memory] --once drain of {EVENTS} x 9 MB: peak RSS {peak:.0f} MB, {counts}")
    assert counts == {"pending": 0, "published": EVENTS, "dead": 0}
    assert 0 < peak < LIMIT_MB, f"peak RSS {peak:.0f} MB"


def test_broker_outage_while_big_events_are_written_stays_under_the_byte_budget(
    client, db_name, pubsub, pubsub_emulator, mongodb_uri
):
    env = relay_env(mongodb_uri, db_name, pubsub.project, _topic(pubsub))
    relay = RelayProcess(env)
    try:
        wait_for(lambda: "no checkpoint" in relay.output(), timeout=60)
        pubsub_emulator.pause()
        try:
            _write_big_events(client, db_name, EVENTS)
            during = _peak_rss_mb(relay.proc.pid)
            assert relay.alive(), relay.output()
        finally:
            pubsub_emulator.resume()
        wait_for(lambda: OutboxAdmin(client[db_name]).counts()["pending"] == 0, timeout=400)
        after = _peak_rss_mb(relay.proc.pid)
        assert relay.terminate() == 0, relay.output()
    finally:
        relay.close()
    counts = OutboxAdmin(client[db_name]).counts()
    print(f"\n[memory] outage: peak RSS {during:.0f} MB during, {after:.0f} MB after; {counts}")
    assert counts == {"pending": 0, "published": EVENTS, "dead": 0}
    assert after < LIMIT_MB, f"peak RSS {after:.0f} MB"


def _drain_peak_mb(env: dict[str, str], args: list[str], client: Any, db: str) -> float:
    """Run a relay until nothing is pending; its peak RSS meanwhile."""
    relay = RelayProcess(env, args)
    try:
        wait_for(lambda: OutboxAdmin(client[db]).counts()["pending"] == 0, timeout=400)
        peak = _peak_rss_mb(relay.proc.pid)
        assert relay.terminate() == 0, relay.output()
    finally:
        relay.close()
    return peak


def test_a_group_member_owning_every_partition_holds_no_more_than_one_relay(
    client, db_name, pubsub, mongodb_uri
):
    # One key each: every partition has events, and all eight sweep and publish at once.
    payload = b"x" * 9_900_000
    for i in range(100):
        with outbox_transaction(client, database=db_name) as tx:
            tx.emit("Big", payload, key=f"key-{i}")
    env = relay_env(mongodb_uri, db_name, pubsub.project, _topic(pubsub))
    single = _drain_peak_mb(env, ["--name", "single"], client, db_name)
    client[db_name].outbox.update_many({}, {"$set": {"status": "pending"}})
    member = _drain_peak_mb(env, ["--name", "group", "--partitions", "8"], client, db_name)
    print(f"\n[memory] 100 x 9.9 MB: one relay {single:.0f} MB, member of 8 {member:.0f} MB")
    assert OutboxAdmin(client[db_name]).counts() == {"pending": 0, "published": 100, "dead": 0}
    assert member <= 1.2 * single, f"member {member:.0f} MB, one relay {single:.0f} MB"
    assert member < LIMIT_MB
