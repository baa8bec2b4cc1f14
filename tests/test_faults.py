"""Fault injection with real relay processes, a real mongod and the real emulator.

Each test counts what reached a subscription against what the outbox holds at the end.
Figures (written, delivered, duplicates, recovery times) are printed; run with ``-s`` to see.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from faults import RelayProcess, Writer, check_delivery, committed_ids, relay_env, report
from helpers import wait_for
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from mongo_outbox import ensure_indexes, outbox_transaction
from mongo_outbox._admin import OutboxAdmin
from mongo_outbox._store import OutboxStore
from mongo_outbox.cli import main as cli_main
from mongo_outbox.testing import MongoReplicaSet

pytestmark = pytest.mark.slow


def _emit_marker(client: MongoClient[Any], db: str) -> Any:
    """Emit one event, retrying while the server comes back."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with outbox_transaction(client, database=db) as tx:
                return tx.emit("Marker", b"after the fault", key="marker")
        except PyMongoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _all_published(client: MongoClient[Any], db: str) -> bool:
    return OutboxAdmin(client[db]).counts()["pending"] == 0


def _deliver_all(
    client: MongoClient[Any], db: str, sub: Any, since: float | None = None
) -> tuple[dict[str, dict[str, Any]], float]:
    """Wait until nothing is pending and all of it has arrived.

    Returns what was committed and the seconds from ``since`` (default: now) until nothing
    was pending.
    """
    since = time.monotonic() if since is None else since
    wait_for(lambda: _all_published(client, db), timeout=120)
    elapsed = time.monotonic() - since
    committed = committed_ids(client, db)
    sub.pull_until(len(committed), timeout=120)
    sub.drain_quietly(quiet=1.5)  # later copies too, so that duplicates are counted
    return committed, elapsed


def test_kill_9_relay_repeatedly_while_writing(client, db_name, pubsub, mongodb_uri):
    topic, sub = pubsub.topic()
    env = relay_env(mongodb_uri, db_name, pubsub.project, topic)
    writer = Writer(client, db_name)
    writer.start()
    rng = random.Random(7)
    kills = 0
    try:
        for _ in range(8):
            relay = RelayProcess(env)
            try:
                time.sleep(rng.uniform(0.5, 2.5))  # the fault is *when*: random on purpose
                sub.pull_once(timeout=0.5)
                relay.kill()
                kills += 1
            finally:
                relay.close()
    finally:
        writer.stop()
    final = RelayProcess(env)
    started = time.monotonic()
    try:
        committed, recovered = _deliver_all(client, db_name, sub, since=started)
        assert final.terminate() == 0, final.output()
    finally:
        final.close()
    delivered, duplicates = check_delivery(committed, sub.received)
    report(
        "kill -9 x8",
        kills=kills,
        written=len(committed),
        delivered=delivered,
        duplicates=duplicates,
        lost=len(committed) - delivered,
        drain_after_last_kill_s=round(recovered, 1),
    )
    assert kills == 8
    assert len(committed) > 500


def test_frozen_emulator_is_ridden_out(client, db_name, pubsub, pubsub_emulator, mongodb_uri):
    topic, sub = pubsub.topic()
    relay = RelayProcess(relay_env(mongodb_uri, db_name, pubsub.project, topic))
    writer = Writer(client, db_name, pause=0.01)
    writer.start()
    try:
        wait_for(lambda: sub.pull_once(timeout=0.5), timeout=60)
        pubsub_emulator.pause()
        try:
            time.sleep(10)  # the fault is a 10 s outage
            assert relay.alive(), relay.output()
        finally:
            pubsub_emulator.resume()
        resumed = time.monotonic()
        time.sleep(1)  # workload: keep writing for a second after the outage
        writer.stop()
        committed, caught_up = _deliver_all(client, db_name, sub, since=resumed)
        assert relay.alive(), relay.output()
        assert relay.terminate() == 0
    finally:
        writer.stop()
        relay.close()
    delivered, duplicates = check_delivery(committed, sub.received)
    report(
        "emulator SIGSTOP 10 s",
        written=len(committed),
        delivered=delivered,
        duplicates=duplicates,
        caught_up_after_resume_s=round(caught_up, 1),
    )


def test_poison_document_among_good_events(client, db_name, pubsub, mongodb_uri):
    topic, sub = pubsub.topic()
    with outbox_transaction(client, database=db_name) as tx:
        good = [tx.emit("Good", f"{i}".encode(), key="k") for i in range(3)]
    poison = (
        client[db_name]
        .outbox.insert_one(
            {"type": "Old", "payload": {"v": 1}, "status": "pending", "created_at": "then"}
        )
        .inserted_id
    )
    with outbox_transaction(client, database=db_name) as tx:
        good += [tx.emit("Good", f"{i}".encode(), key="k") for i in range(3, 6)]
    relay = RelayProcess(relay_env(mongodb_uri, db_name, pubsub.project, topic))
    try:
        got = sub.pull_until(6)
        doc = wait_for(lambda: client[db_name].outbox.find_one({"_id": poison, "status": "dead"}))
        assert relay.alive()
        assert relay.terminate() == 0
    finally:
        relay.close()
    assert [m.attributes["outbox_event_id"] for m in got] == [str(g) for g in good]
    assert "payload" in doc["last_error"]
    report("poison", good=6, delivered=len(got), poison_reason=doc["last_error"])


def test_resume_token_lost_from_the_oplog(pubsub, outbox_database):
    db_name = outbox_database
    with MongoReplicaSet(extra_args=["--oplogSize", "990", "--syncdelay", "1"]) as rs:
        client: MongoClient[Any] = MongoClient(rs.uri, tz_aware=True)
        ensure_indexes(client, db_name)
        topic, sub = pubsub.topic()
        env = relay_env(rs.uri, db_name, pubsub.project, topic)
        relay = RelayProcess(env)
        try:
            with outbox_transaction(client, database=db_name) as tx:
                tx.emit("Before", b"0", key="k")
            sub.pull_until(1)
            wait_for(lambda: OutboxStore(client[db_name]).load_state("default").get("resume_token"))
            assert relay.terminate() == 0
        finally:
            relay.close()
        token = OutboxStore(client[db_name]).load_state("default")["resume_token"]
        with outbox_transaction(client, database=db_name) as tx:
            while_down = [tx.emit("WhileDown", f"{i}".encode(), key="k") for i in range(50)]
        # ~1.2 GB of throwaway oplog traffic pushes the token out of a 990 MB oplog.
        junk = client[db_name].junk
        blob = b"x" * (1024 * 1024 - 200)
        first_entry = client.local["oplog.rs"].find_one(sort=[("$natural", 1)])["ts"]
        for _ in range(12):
            junk.insert_many([{"b": blob} for _ in range(100)])
            junk.delete_many({})
        wait_for(
            lambda: client.local["oplog.rs"].find_one(sort=[("$natural", 1)])["ts"] != first_entry,
            timeout=120,
        )
        with pytest.raises(OperationFailure, match=r"(?i)resume|history"):
            client[db_name].outbox.watch(start_after=token).try_next()
        with outbox_transaction(client, database=db_name) as tx:
            after = [tx.emit("After", f"{i}".encode(), key="k") for i in range(10)]
        relay = RelayProcess(env)
        started = time.monotonic()
        try:
            got = sub.pull_until(61, timeout=120)
            recovered = time.monotonic() - started
            assert relay.terminate() == 0
            output = relay.output()
        finally:
            relay.close()
            client.close()
    assert "unusable" in output, output
    ids = [m.attributes["outbox_event_id"] for m in got[1:]]
    assert ids == [str(i) for i in while_down + after]
    report("oplog rollover", events=61, delivered=len(got), recovery_s=round(recovered, 1))


def test_two_relays_on_one_outbox(client, db_name, pubsub, mongodb_uri):
    topic, sub = pubsub.topic()
    env = relay_env(mongodb_uri, db_name, pubsub.project, topic)
    first = RelayProcess(env)
    wait_for(lambda: OutboxStore(client[db_name]).load_state("default").get("lease_owner"))
    second = RelayProcess(env)
    writer = Writer(client, db_name, pause=0.005)
    writer.start()
    try:
        time.sleep(3)  # both run side by side under load
        owner = OutboxStore(client[db_name]).load_state("default")["lease_owner"]
        assert f":{first.proc.pid}:" in owner, "the first relay keeps the lease"
        first.kill()
        killed = time.monotonic()
        wait_for(
            lambda: (
                f":{second.proc.pid}:"
                in (OutboxStore(client[db_name]).load_state("default").get("lease_owner") or "")
            ),
            timeout=30,
        )
        takeover = time.monotonic() - killed
        time.sleep(1)  # workload: keep writing for a second under the new lease holder
        writer.stop()
        committed, _ = _deliver_all(client, db_name, sub)
        assert second.terminate() == 0
        assert "standby" in second.output()
    finally:
        writer.stop()
        first.close()
        second.close()
    delivered, duplicates = check_delivery(committed, sub.received)
    report(
        "two relays",
        written=len(committed),
        delivered=delivered,
        duplicates=duplicates,
        takeover_s=round(takeover, 1),
    )
    assert duplicates < 500, "only one relay may publish: duplicates stay under one batch"
    assert takeover < 2 * 2 + 2  # lease ttl 2 s, polled a few times a second


def test_failing_key_waits_and_requeue_sends_it_in_order(client, db_name, pubsub, mongodb_uri):
    topic, sub = pubsub.topic()
    side_topic, side_sub = pubsub.topic()
    env = relay_env(
        mongodb_uri,
        db_name,
        pubsub.project,
        topic,
        MONGO_OUTBOX_MAX_ATTEMPTS="2",
        MONGO_OUTBOX_DEAD_KEY_POLICY="hold",
    )
    relay = RelayProcess(env)
    try:
        with outbox_transaction(client, database=db_name) as tx:
            k_first = tx.emit("K", b"k0", key="K", topic=side_topic)
        side_sub.pull_until(1)
        pubsub.publisher_client.delete_topic(
            topic=pubsub.publisher_client.topic_path(pubsub.project, side_topic)
        )
        with outbox_transaction(client, database=db_name) as tx:
            k_ids = [tx.emit("K", f"k{i}".encode(), key="K", topic=side_topic) for i in (1, 2, 3)]
            others = [tx.emit("O", f"o{i}".encode(), key="O") for i in range(5)]
        got = sub.pull_until(5)
        assert [m.attributes["outbox_event_id"] for m in got] == [str(o) for o in others]
        wait_for(lambda: client[db_name].outbox.find_one({"_id": k_ids[0], "status": "dead"}))
        # The key is held: later K events stay pending, unpublished.
        statuses = [client[db_name].outbox.find_one({"_id": i})["status"] for i in k_ids[1:]]
        assert statuses == ["pending", "pending"]
        pubsub.publisher_client.create_topic(
            name=pubsub.publisher_client.topic_path(pubsub.project, side_topic)
        )
        _, fresh_sub = pubsub.topic_subscription(side_topic)
        code = cli_main(
            ["requeue", "--mongo-uri", mongodb_uri, "--database", db_name, "--key", "K"]
        )
        assert code == 0
        got_k = fresh_sub.pull_until(3, timeout=60)
        assert relay.terminate() == 0
    finally:
        relay.close()
    assert [m.attributes["outbox_event_id"] for m in got_k] == [str(i) for i in k_ids]
    assert side_sub.received[0].attributes["outbox_event_id"] == str(k_first)
    report("failing key + requeue", held=2, requeued=1, delivered_in_order=len(got_k))


def test_second_signal_exits_at_once_while_the_first_waits_for_the_batch(
    client, db_name, pubsub, pubsub_emulator, mongodb_uri
):
    topic, sub = pubsub.topic()
    env = relay_env(mongodb_uri, db_name, pubsub.project, topic, MONGO_OUTBOX_LOG_LEVEL="DEBUG")
    relay = RelayProcess(env)
    try:
        with outbox_transaction(client, database=db_name) as tx:
            tx.emit("E", b"first")
        sub.pull_until(1)
        pubsub_emulator.pause()
        try:
            published_before = relay.output().count("publishing 1 event(s)")
            with outbox_transaction(client, database=db_name) as tx:
                stuck = tx.emit("E", b"stuck")
            # The relay has sent the batch to the frozen broker and is waiting for it.
            wait_for(
                lambda: relay.output().count("publishing 1 event(s)") > published_before,
                timeout=10,
            )
            relay.proc.send_signal(signal.SIGTERM)
            with pytest.raises(subprocess.TimeoutExpired):
                relay.proc.wait(timeout=2)  # the first signal waits for the batch in flight
            relay.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = relay.proc.wait(timeout=10)
            exited_in = time.monotonic() - started
        finally:
            pubsub_emulator.resume()
    finally:
        relay.close()
    assert code == 1
    assert exited_in < 5
    # Nothing is lost: the event is still pending for the next relay.
    assert client[db_name].outbox.find_one({"_id": stuck})["status"] == "pending"
    report("double SIGTERM", exit_code=code, exited_after_second_s=round(exited_in, 2))


def _ride_out_mongo_fault(
    pubsub: Any, db_name: str, name: str, fault: Callable[[MongoReplicaSet], Any]
) -> None:
    """Relay process and writer on a replica set of their own; apply ``fault`` mid-stream.

    Then a marker event must arrive, and everything committed with it.
    """
    with MongoReplicaSet() as rs:
        client: MongoClient[Any] = MongoClient(rs.uri, tz_aware=True)
        ensure_indexes(client, db_name)
        topic, sub = pubsub.topic()
        relay = RelayProcess(relay_env(rs.uri, db_name, pubsub.project, topic))
        writer = Writer(client, db_name, pause=0.01)
        writer.start()
        try:
            wait_for(lambda: len(sub.pull_once(timeout=0.5)) and len(sub.received) > 100, 60)
            started = time.monotonic()
            fault(rs)
            marker = str(_emit_marker(client, db_name))
            wait_for(
                lambda: (
                    sub.pull_once(timeout=0.5) is not None
                    and marker in {m.attributes["outbox_event_id"] for m in sub.received}
                ),
                timeout=60,
            )
            recovered = time.monotonic() - started
            writer.stop()
            committed, _ = _deliver_all(client, db_name, sub)
            assert relay.alive(), relay.output()
            assert relay.terminate() == 0
        finally:
            writer.stop()
            relay.close()
            client.close()
    delivered, duplicates = check_delivery(committed, sub.received)
    report(
        name,
        written=len(committed),
        delivered=delivered,
        duplicates=duplicates,
        writer_errors=writer.errors,
        fault_to_marker_published_s=round(recovered, 1),
    )


def test_mongod_restart_under_a_running_relay(pubsub, outbox_database):
    _ride_out_mongo_fault(pubsub, outbox_database, "mongod restart", MongoReplicaSet.restart)


def test_primary_step_down_under_a_running_relay(pubsub, outbox_database):
    def step_down(rs: MongoReplicaSet) -> None:
        with MongoClient(rs.direct_uri) as direct:
            # A single node has no one to hand over to: force it, for 2 seconds.
            direct.admin.command("replSetStepDown", 2, force=True)

    _ride_out_mongo_fault(pubsub, outbox_database, "primary step-down", step_down)
