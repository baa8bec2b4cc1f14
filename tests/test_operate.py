"""Operating the relay: /metrics, /healthz, /readyz, oplog headroom, the typo'd database.

Real replica sets and the real emulator; relays run in threads of this process with their
HTTP side on a free port (the CLI's --http-port is tested with a relay process in test_cli).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from helpers import free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient

from mongo_outbox import ConfigurationError, InMemoryPublisher, outbox_transaction
from mongo_outbox.relay import Relay, RelayConfig
from mongo_outbox.relay._http import RelayHTTPServer
from mongo_outbox.testing import MongoReplicaSet


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        return 0, str(exc.reason)  # not listening (yet)


def _metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = _get(port, "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def _value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (there must be one)."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in metrics.items() if n == name and wanted <= ls]
    assert found, f"no sample {name} with {labels}"
    return sum(found)


@pytest.fixture
def served(request):
    servers: list[RelayHTTPServer] = []

    def serve(relay: Relay) -> int:
        server = RelayHTTPServer(relay, "127.0.0.1", 0)
        servers.append(server)
        return server.port

    yield serve
    for server in servers:
        server.close()


def _emit(client, db, n, *, topic=None, key="k"):
    ids = []
    for start in range(0, n, 100):
        with outbox_transaction(client, database=db) as tx:
            ids += [tx.emit("E", b"x", topic=topic, key=key) for _ in range(min(100, n - start))]
    return ids


def test_metrics_count_what_reached_pubsub_and_gauges_follow_the_drain(
    client, db_name, pubsub, relay_factory, served
):
    topic, sub = pubsub.topic()
    good = _emit(client, db_name, 2000, topic=topic)
    _emit(client, db_name, 20, topic="no-such-topic", key=None)
    runner = relay_factory(
        db_name, start=False, sample_interval=0.3, max_attempts=2, retry_initial=0.05
    )
    relay = runner.relay
    port = served(relay)
    relay.sampler.sample()  # before the relay starts: everything is pending
    before = _metrics(port)
    labels = {"outbox": f"{db_name}.outbox", "relay": "default"}
    assert _value(before, "mongo_outbox_pending_events", **labels) == 2020
    assert _value(before, "mongo_outbox_oldest_pending_age_seconds", **labels) > 0
    runner.start()
    received = sub.pull_until(2000, timeout=120)
    wait_for(lambda: client[db_name].outbox.count_documents({"status": "dead"}) == 20)

    def drained() -> dict[Any, float] | None:
        m = _metrics(port)
        done = _value(m, "mongo_outbox_pending_events") == 0
        return m if done and _value(m, "mongo_outbox_dead_events") == 20 else None

    after = wait_for(drained, timeout=30)
    unique = {m.attributes["outbox_event_id"] for m in received}
    assert unique == {str(i) for i in good}
    published = _value(after, "mongo_outbox_events_published_total", topic=topic, **labels)
    assert published == len(unique) == relay.stats.published
    assert _value(after, "mongo_outbox_events_failed_total", kind="permanent") == 40  # 20 x 2
    assert _value(after, "mongo_outbox_events_dead_total", **labels) == 20
    assert _value(after, "mongo_outbox_dead_events", **labels) == 20
    assert _value(after, "mongo_outbox_oldest_pending_age_seconds", **labels) == 0
    assert _value(after, "mongo_outbox_event_lag_seconds_count", **labels) == 2000
    assert _value(after, "mongo_outbox_publish_duration_seconds_count", **labels) >= 1
    assert _value(after, "mongo_outbox_lease_active", **labels) == 1
    assert _value(after, "mongo_outbox_oplog_window_seconds", **labels) >= 0
    assert 0 <= _value(after, "mongo_outbox_checkpoint_age_seconds", **labels) < 30
    runner.stop()


def test_readyz_tells_active_from_standby(client, db_name, relay_factory, served):
    first = relay_factory(db_name, publisher=InMemoryPublisher(), lease_ttl=10.0)
    first_port = served(first.relay)
    wait_for(lambda: _get(first_port, "/readyz") == (200, "active\n"), timeout=20)
    second = relay_factory(db_name, publisher=InMemoryPublisher(), lease_ttl=10.0)
    second_port = served(second.relay)
    wait_for(lambda: _get(second_port, "/readyz") == (200, "standby\n"), timeout=20)
    assert _get(second_port, "/healthz")[0] == 200  # a standby is healthy
    assert _value(_metrics(second_port), "mongo_outbox_lease_active") == 0
    first.stop()
    second.stop()


def test_a_mistyped_database_is_reported_and_never_created(client, db_name, relay_factory, served):
    name = f"{db_name}_typo"  # unique to this test; never created, so nothing to drop
    relay = relay_factory(name, publisher=InMemoryPublisher(), sample_interval=0.2)
    port = served(relay.relay)
    _, body = wait_for(
        lambda: (r := _get(port, "/readyz"))[0] == 503 and "no outbox collection" in r[1] and r
    )
    assert f"{name}.outbox" in body
    relay.stop()
    assert name not in client.list_database_names()
    with pytest.raises(ConfigurationError, match="no outbox collection"):
        Relay(client, InMemoryPublisher(), RelayConfig(database=name)).run_once()
    assert name not in client.list_database_names()


@pytest.mark.slow
def test_probes_while_mongod_is_frozen_follow_their_rules_and_recover(pubsub, served):
    """/readyz leaves ``active`` within one renewal interval of a missed lease renewal;
    /healthz fails once the relay has made no progress for --unhealthy-after, although the
    failing polls of the restarted pipeline keep coming; both recover after the thaw."""
    with MongoReplicaSet() as rs:
        # Short timeouts: the pipeline fails (and its polls fail) fast, as in the issue.
        client: MongoClient[Any] = MongoClient(
            rs.uri, tz_aware=True, serverSelectionTimeoutMS=1000, socketTimeoutMS=3000
        )
        db = "frozen"
        _emit(client, db, 1)
        ttl, after = 4.0, 8.0  # renewals every 1 s: fresh while at most 2 s old
        config = RelayConfig(
            database=db, default_topic="t", unhealthy_after=after, lease_ttl=ttl, transient_max=0.5
        )
        relay = Relay(client, InMemoryPublisher(), config)
        from helpers import RelayThread

        runner = RelayThread(relay).start()
        port = served(relay)
        try:
            wait_for(lambda: _get(port, "/readyz") == (200, "active\n"))
            wait_for(lambda: _get(port, "/healthz")[0] == 200 and relay.stats.published == 1)
            frozen_at = time.monotonic()
            os.kill(rs.pid, signal.SIGSTOP)
            try:
                _, why_not_ready = wait_for(
                    lambda: (r := _get(port, "/readyz"))[0] == 503 and r, timeout=30, interval=0.05
                )
                not_ready_after = time.monotonic() - frozen_at
                _, why_unhealthy = wait_for(
                    lambda: (r := _get(port, "/healthz"))[0] == 503 and r, timeout=60, interval=0.1
                )
                unhealthy_after = time.monotonic() - frozen_at
            finally:
                os.kill(rs.pid, signal.SIGCONT)
            print(
                f"frozen: /readyz 503 after {not_ready_after:.2f}s ({why_not_ready.strip()}), "
                f"/healthz 503 after {unhealthy_after:.2f}s ({why_unhealthy.strip()})"
            )
            # The last renewal came at most one interval before the freeze.
            assert not_ready_after <= ttl / 2 + 0.5, (not_ready_after, why_not_ready)
            assert "no progress" in why_unhealthy, why_unhealthy
            # The last progress came at most a getMore (1 s) before the freeze.
            assert after - 1.5 <= unhealthy_after <= after + 1.5, (unhealthy_after, why_unhealthy)
            wait_for(lambda: _get(port, "/healthz")[0] == 200, timeout=60)
            wait_for(lambda: _get(port, "/readyz") == (200, "active\n"), timeout=60)
            _emit(client, db, 1)
            wait_for(lambda: relay.stats.published == 2, timeout=60)
        finally:
            runner.stop()
            client.close()


@pytest.mark.slow
def test_low_oplog_headroom_is_warned_about_before_the_token_is_lost(caplog, served):
    caplog.set_level(logging.WARNING, logger="mongo_outbox")
    # The smallest oplog mongod allows: the headroom shrinks as other writes go on.
    with MongoReplicaSet(extra_args=["--oplogSize", "990"]) as rs:
        client: MongoClient[Any] = MongoClient(rs.uri, tz_aware=True)
        db = "headroom"
        client[db].create_collection("outbox")
        # The relay keeps retrying a failing topic, so its checkpoint stays where it is.
        memory = InMemoryPublisher()
        memory.fail_topic("sick-topic", transient=True)
        config = RelayConfig(database=db, isolate_after=1e6, sample_interval=0.2, transient_max=0.5)
        relay = Relay(client, memory, config)
        from helpers import RelayThread

        runner = RelayThread(relay).start()
        port = served(relay)
        try:
            wait_for(lambda: relay._role.checkpoint.token is not None)
            _emit(client, db, 1, topic="sick-topic")
            wait_for(lambda: memory.calls > 0)
            token = relay._role.checkpoint.token
            junk = client[db].junk

            def warned() -> bool:
                junk.insert_one({"x": 1})  # the oplog's newest entry moves on; the token does not
                return any("oplog headroom low" in r.getMessage() for r in caplog.records)

            wait_for(warned, timeout=120, interval=0.1)
            m = _metrics(port)
            window = _value(m, "mongo_outbox_oplog_window_seconds")
            room = _value(m, "mongo_outbox_oplog_headroom_seconds")
            assert room < window / 4, (room, window)
            # Warned while the token is still usable: before history is lost, not after.
            with client[db].outbox.watch(start_after=token, max_await_time_ms=10) as stream:
                stream.try_next()
        finally:
            runner.stop()
            client.close()


def test_relay_process_serves_metrics_that_match_the_subscription(
    client, db_name, pubsub, mongodb_uri
):
    from faults import RelayProcess, relay_env

    topic, sub = pubsub.topic()
    port = free_port()
    env = relay_env(
        mongodb_uri,
        db_name,
        pubsub.project,
        topic,
        MONGO_OUTBOX_HTTP_PORT=str(port),
        MONGO_OUTBOX_HTTP_HOST="127.0.0.1",
        MONGO_OUTBOX_MAX_ATTEMPTS="1",
    )
    relay = RelayProcess(env)
    try:
        wait_for(lambda: relay.alive() and _get(port, "/readyz") == (200, "active\n"), timeout=30)
        _emit(client, db_name, 2000)
        _emit(client, db_name, 5, topic="no-such-topic", key=None)
        received = sub.pull_until(2000, timeout=120)

        def settled() -> dict[Any, float] | None:
            m = _metrics(port)
            dead = _value(m, "mongo_outbox_events_dead_total")
            return m if dead == 5 and _value(m, "mongo_outbox_events_published_total") else None

        m = wait_for(settled, timeout=60)
        assert _value(m, "mongo_outbox_events_published_total", topic=topic) == len(
            {r.attributes["outbox_event_id"] for r in received}
        )
        assert _get(port, "/healthz") == (200, "ok\n")
        assert relay.terminate() == 0, relay.output()
    finally:
        relay.close()


def test_status_shows_the_oplog_window_and_the_checkpoint_headroom(
    client, db_name, relay_factory, mongodb_uri, capsys
):
    from mongo_outbox.cli import main

    relay = relay_factory(db_name, publisher=InMemoryPublisher())
    wait_for(lambda: client[db_name].outbox_relay_state.find_one({"resume_token": {"$ne": None}}))
    relay.stop()
    assert main(["status", "--mongo-uri", mongodb_uri, "--database", db_name]) == 0
    out = capsys.readouterr().out
    assert "oplog window" in out, out
    assert "checkpoint headroom" in out, out
    assert main(["status", "--mongo-uri", mongodb_uri, "--database", db_name, "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["oplog_window_s"] >= 0
    assert report["oplog_headroom_s"] is not None
    assert report["oplog_headroom_s"] >= 0
    assert report["oplog_unavailable"] is None


def test_kubernetes_and_docker_probe_the_endpoints_the_relay_serves():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    manifest = (root / "deploy" / "k8s" / "base" / "deployment.yaml").read_text()
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    healthcheck = (root / "docker" / "healthcheck.py").read_text()
    for text in (manifest, healthcheck):
        assert "/healthz" in text
    assert "9464" in manifest
    assert "/readyz" in manifest
    assert "secretKeyRef" in manifest
    assert "MONGO_OUTBOX_MONGO_URI" in manifest
    assert "terminationGracePeriodSeconds" in manifest
    assert "HEALTHCHECK" in dockerfile
    assert "MONGO_OUTBOX_HTTP_PORT=9464" in dockerfile
    assert "MONGO_OUTBOX_HTTP_PORT" in healthcheck


def test_healthz_fails_when_the_pipeline_restarts_in_a_loop(client, db_name, served, monkeypatch):
    from pymongo.errors import OperationFailure

    from mongo_outbox._store import OutboxStore

    def refuse(self, ids, at):
        raise OperationFailure("document failed validation", code=121)

    monkeypatch.setattr(OutboxStore, "mark_published", refuse)
    _emit(client, db_name, 5)
    config = RelayConfig(
        database=db_name, default_topic="t", unhealthy_after=3.0, transient_max=0.5
    )
    relay = Relay(client, InMemoryPublisher(), config)
    from helpers import RelayThread

    runner = RelayThread(relay).start()
    port = served(relay)
    try:
        _, reason = wait_for(lambda: (r := _get(port, "/healthz"))[0] == 503 and r, timeout=30)
        assert "pipeline failing" in reason, reason
        assert relay.stats.restarts >= 2
    finally:
        runner.stop_event.set()
        runner.thread.join(timeout=60)


def test_an_outbox_dropped_under_a_running_relay_is_not_recreated(client, db_name, relay_factory):
    name = db_name  # this test's own database, outbox created by the fixture
    relay = relay_factory(name, publisher=InMemoryPublisher(), sample_interval=0.2)
    wait_for(lambda: relay.relay.health.ready() == (True, "active"), timeout=30)
    client.drop_database(name)
    # The stream is invalidated (a pipeline restart) or the checkpoint's fenced write finds no
    # state document (back to standby), whichever comes first; either way the relay waits for
    # the outbox instead of taking its lease (which would recreate the database).
    wait_for(lambda: "no outbox collection" in relay.relay.health.ready()[1], timeout=30)
    assert name not in client.list_database_names()
    relay.stop()
    assert name not in client.list_database_names()


def test_a_group_member_labels_its_partitions_gauges(
    client, db_name, pubsub, relay_factory, served
):
    topic, sub = pubsub.topic()
    runner = relay_factory(db_name, default_topic=topic, partitions=3, owner="member-a")
    port = served(runner.relay)
    labels = {"outbox": f"{db_name}.outbox", "relay": "default"}
    # Active: it has built the slot index (a build makes concurrent transactions conflict) and
    # owns its partitions, which the member's role follows at its next heartbeat.
    wait_for(lambda: _get(port, "/readyz") == (200, "active\n"), timeout=30)
    _emit(client, db_name, 30)
    sub.pull_until(30, timeout=30)
    metrics = wait_for(
        lambda: (
            (
                m
                if all(
                    ("mongo_outbox_lease_active", frozenset({**labels, "partition": p}.items()))
                    in m
                    for p in "012"
                )
                else None
            )
            if (m := _metrics(port))
            else None
        ),
        timeout=30,
    )
    for p in "012":
        assert _value(metrics, "mongo_outbox_lease_active", partition=p) == 1
        assert _value(metrics, "mongo_outbox_held_keys", partition=p) == 0
    assert _value(metrics, "mongo_outbox_events_published_total", topic=topic) == 30
    runner.stop()
    # Partitions given back leave no series behind.
    after = _metrics(port)
    assert not [k for k in after if k[0] == "mongo_outbox_lease_active"]


def _request(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as reply:
        return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()


def test_metrics_are_prometheus_clients_exposition_with_process_and_build_info(
    client, db_name, relay_factory, served
):
    import gzip

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    from mongo_outbox import __version__

    runner = relay_factory(db_name, publisher=InMemoryPublisher(), default_topic="orders")
    port = served(runner.relay)
    labels = {"outbox": f"{db_name}.outbox", "relay": "default"}
    # Before any event: the failure counters of the known topic exist, at 0, for both kinds.
    m = _metrics(port)
    for kind in ("transient", "permanent"):
        assert _value(m, "mongo_outbox_events_failed_total", topic="orders", kind=kind) == 0
    assert _value(m, "mongo_outbox_events_published_total", topic="orders", **labels) == 0
    assert _value(m, "mongo_outbox_build_info", version=__version__, **labels) == 1
    assert _value(m, "process_resident_memory_bytes") > 0
    assert _value(m, "process_open_fds") > 0
    assert ("python_info", frozenset()) not in m  # labelled with the interpreter's version
    assert [k for k in m if k[0] == "python_info"]

    status, headers, body = _request(
        port, "/metrics", Accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text"), headers
    text = body.decode()
    assert text.endswith("# EOF\n")
    names = {family.name for family in om_parse(text)}
    assert {"mongo_outbox_events_failed", "mongo_outbox_build", "process_cpu_seconds"} <= names

    status, headers, body = _request(port, "/metrics", **{"Accept-Encoding": "gzip"})
    assert headers.get("content-encoding") == "gzip"
    assert b"mongo_outbox_pending_events" in gzip.decompress(body)
    status, headers, _ = _request(port, "/metrics")
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    assert _get(port, "/nothing")[0] == 404
    runner.stop()


def test_dead_events_gauge_moves_when_the_relay_sets_events_dead(
    client, db_name, relay_factory, served
):
    memory = InMemoryPublisher()
    memory.fail_topic("poisoned")
    # No sample after the first: only the relay itself can move the gauge.
    runner = relay_factory(
        db_name, publisher=memory, start=False, sample_interval=3600.0, max_attempts=1
    )
    relay = runner.relay
    port = served(relay)
    runner.start()
    wait_for(lambda: _get(port, "/readyz") == (200, "active\n"), timeout=30)
    wait_for(lambda: _value(_metrics(port), "mongo_outbox_dead_events") == 0)
    _emit(client, db_name, 3, topic="poisoned", key=None)
    wait_for(lambda: client[db_name].outbox.count_documents({"status": "dead"}) == 3)
    started = time.monotonic()
    wait_for(lambda: _value(_metrics(port), "mongo_outbox_dead_events") == 3, timeout=5)
    assert time.monotonic() - started < 2
    runner.stop()


def _threads() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


@pytest.mark.slow
def test_500_idle_clients_neither_grow_threads_nor_delay_probes(
    client, db_name, relay_factory, pubsub
):
    import socket

    topic, sub = pubsub.topic()
    runner = relay_factory(db_name, default_topic=topic)
    server = RelayHTTPServer(runner.relay, "127.0.0.1", 0, idle_timeout=3.0)
    port = server.port
    sockets: list[socket.socket] = []
    try:
        wait_for(lambda: _get(port, "/readyz") == (200, "active\n"), timeout=30)
        before = _threads()
        for i in range(500):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request
            sockets.append(sock)
        _emit(client, db_name, 200)  # the relay publishes meanwhile
        worst = 0.0
        for _ in range(10):
            started = time.monotonic()
            assert _get(port, "/healthz") == (200, "ok\n")
            worst = max(worst, time.monotonic() - started)
        threads = _threads()
        print(
            f"threads: {before} before, {threads} with 500 idle sockets; /healthz <= {worst:.3f}s"
        )
        assert worst < 1.0
        assert threads <= before + 5, (before, threads)
        assert len(sub.pull_until(200, timeout=60)) >= 200

        def all_closed() -> bool:
            closed = 0
            for sock in sockets:
                sock.settimeout(0.01)
                try:
                    closed += sock.recv(1) == b""
                except TimeoutError:
                    pass  # still open
                except OSError:
                    closed += 1  # reset: closed too
            return closed == len(sockets)

        started = time.monotonic()
        wait_for(all_closed, timeout=20, interval=0.5)
        print(f"idle sockets closed by the relay within {time.monotonic() - started:.1f}s")
    finally:
        for sock in sockets:
            sock.close()
        server.close()
        runner.stop()


def test_at_the_connection_cap_a_probe_waits_only_until_idle_ones_are_closed(
    client, db_name, relay_factory
):
    import socket

    runner = relay_factory(db_name, publisher=InMemoryPublisher())
    server = RelayHTTPServer(runner.relay, "127.0.0.1", 0, connection_limit=10, idle_timeout=1.0)
    port = server.port
    sockets: list[socket.socket] = []
    try:
        wait_for(lambda: _get(port, "/readyz") == (200, "active\n"), timeout=30)
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(25)]
        started = time.monotonic()
        assert _get(port, "/healthz") == (200, "ok\n")
        waited = time.monotonic() - started
        # 25 idle connections ahead of it, 10 served at a time, each closed after 1 s idle
        # (checked every second): three rounds at most.
        assert waited < 7.0, waited
    finally:
        for sock in sockets:
            sock.close()
        server.close()
        runner.stop()


def test_a_failing_broker_keeps_the_probes_up_once_its_topic_is_isolated(
    client, db_name, relay_factory, served
):
    """Restarting the relay would not heal the broker: the failing topic is isolated within
    --isolate-after and the loop goes on making progress."""
    memory = InMemoryPublisher()
    memory.fail_topic("frozen-topic", transient=True)
    runner = relay_factory(
        db_name, publisher=memory, isolate_after=1.0, transient_max=0.5, unhealthy_after=3.0
    )
    port = served(runner.relay)
    wait_for(lambda: _get(port, "/readyz") == (200, "active\n"), timeout=30)
    _emit(client, db_name, 5, topic="frozen-topic")
    wait_for(lambda: memory.calls > 0)
    deadline = time.monotonic() + 8.0  # well past --unhealthy-after
    while time.monotonic() < deadline:
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz") == (200, "active\n")
        time.sleep(0.25)  # sampling the probes over time, not waiting for a condition
    assert client[db_name].outbox.count_documents({"status": "pending"}) == 5
    runner.stop()
