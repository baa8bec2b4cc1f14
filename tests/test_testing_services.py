"""Tests for mongo_outbox.testing: real mongod and Pub/Sub emulator, no mocks."""

from __future__ import annotations

import contextlib
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from pymongo import MongoClient

from mongo_outbox.testing import (
    MongoReplicaSet,
    PubSubEmulator,
    ServiceStartError,
    ServiceUnavailable,
    find_mongod,
    find_pubsub_emulator,
)
from mongo_outbox.testing import _emulator as emulator_module
from mongo_outbox.testing.plugin import REQUIRE_SERVICES_ENV, require_services, unavailable

# -- skip vs fail -------------------------------------------------------------------------

pytest_plugins = ["pytester"]


def test_unavailable_skips_by_default(monkeypatch):
    monkeypatch.delenv(REQUIRE_SERVICES_ENV, raising=False)
    assert not require_services()
    with pytest.raises(pytest.skip.Exception, match="install mongod"):
        unavailable("install mongod")


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_unavailable_fails_when_services_required(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_SERVICES_ENV, value)
    assert require_services()
    with pytest.raises(pytest.fail.Exception, match="install mongod"):
        unavailable("install mongod")


@pytest.mark.parametrize("value", ["", "0", "no"])
def test_require_services_off_values(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_SERVICES_ENV, value)
    assert not require_services()


def test_service_start_error_is_unavailable():
    assert issubclass(ServiceStartError, ServiceUnavailable)


# -- binary discovery ---------------------------------------------------------------------


def _executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_pubsub_emulator_none_without_gcloud(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_pubsub_emulator() is None


def test_find_pubsub_emulator_resolves_sdk_root_and_needs_java(monkeypatch, tmp_path):
    sdk = tmp_path / "sdk"
    gcloud = _executable(sdk / "bin" / "gcloud")
    emulator = _executable(sdk / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator")
    link_dir = tmp_path / "usr-bin"
    link_dir.mkdir()
    (link_dir / "gcloud").symlink_to(gcloud)  # like /usr/bin/gcloud -> the SDK
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(link_dir))
    assert find_pubsub_emulator() is None  # no java
    java_dir = tmp_path / "jdk" / "bin"
    _executable(java_dir / "java")
    monkeypatch.setenv("PATH", f"{link_dir}{os.pathsep}{java_dir}")
    assert find_pubsub_emulator() == str(emulator)


def test_find_mongod_prefers_path(monkeypatch, tmp_path):
    fake = _executable(tmp_path / "mongod")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_mongod() == str(fake)


def test_missing_emulator_error_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceUnavailable, match="PUBSUB_EMULATOR_HOST"):
        PubSubEmulator().start()


# -- MongoDB ------------------------------------------------------------------------------


def test_replica_set_transaction_and_change_stream(mongo_client, outbox_database):
    db = mongo_client[outbox_database]
    db.create_collection("a")
    db.create_collection("b")
    with db.b.watch(max_await_time_ms=200) as stream:
        with mongo_client.start_session() as session, session.start_transaction():
            db.a.insert_one({"_id": 1}, session=session)
            db.b.insert_one({"_id": 2}, session=session)
        deadline = time.monotonic() + 10
        change = None
        while change is None and time.monotonic() < deadline:
            change = stream.try_next()
    assert db.a.count_documents({}) == 1
    assert change is not None
    assert change["operationType"] == "insert"
    assert change["documentKey"] == {"_id": 2}


def test_aborted_transaction_leaves_nothing(mongo_client, outbox_database):
    db = mongo_client[outbox_database]
    db.create_collection("a")
    with mongo_client.start_session() as session:
        session.start_transaction()
        db.a.insert_one({"_id": 1}, session=session)
        session.abort_transaction()
    assert db.a.count_documents({}) == 0


def test_outbox_database_is_unique_and_dropped_after_the_test(
    pytester, mongodb_uri, mongo_client, monkeypatch
):
    name_file = pytester.path / "name.txt"
    monkeypatch.setenv("MONGODB_URI", mongodb_uri)
    monkeypatch.setenv("DB_NAME_FILE", str(name_file))
    pytester.makepyfile(
        """
        import os

        def test_uses_it(mongo_client, outbox_database):
            mongo_client[outbox_database].c.insert_one({"x": 1})
            assert outbox_database in mongo_client.list_database_names()
            with open(os.environ["DB_NAME_FILE"], "w") as f:
                f.write(outbox_database)
        """
    )
    result = pytester.runpytest_subprocess()  # the plugin loads through its entry point
    result.assert_outcomes(passed=1)
    name = name_file.read_text()
    assert name.startswith("test_")
    assert name not in mongo_client.list_database_names()


def test_kill_and_restart_keep_data(mongo_replica_set, mongo_client, outbox_database):
    coll = mongo_client[outbox_database].things
    coll.insert_one({"_id": "survives"})  # implicit w:majority, journaled
    old_pid = mongo_replica_set.pid
    port = mongo_replica_set.port
    mongo_replica_set.kill()
    assert not mongo_replica_set.is_running()
    assert mongo_replica_set.pid is None
    try:
        mongo_replica_set.restart()
    finally:
        if not mongo_replica_set.is_running():
            mongo_replica_set.restart()
    assert mongo_replica_set.is_running()
    assert mongo_replica_set.pid != old_pid
    assert mongo_replica_set.port == port
    assert coll.find_one({"_id": "survives"}) == {"_id": "survives"}


def test_own_replica_set_lifecycle():
    with MongoReplicaSet(extra_args=["--oplogSize", "990", "--syncdelay", "1"]) as rs:
        assert rs.uri == f"mongodb://127.0.0.1:{rs.port}/?replicaSet=rs0"
        dbpath = rs.dbpath
        pid = rs.pid
        assert pid is not None
        assert Path(dbpath, "mongod.log").exists()
        client: MongoClient = MongoClient(rs.direct_uri)
        try:
            argv = client.admin.command("getCmdLineOpts")["argv"]
            assert argv[argv.index("--oplogSize") + 1] == "990"
            rs.restart()  # graceful stop + start, same port, no re-initiate
            assert client.admin.command("hello")["isWritablePrimary"]
        finally:
            client.close()
    assert not rs.is_running()
    assert not os.path.exists(dbpath)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_mongod_start_failure_reports_log_tail(tmp_path):
    rs = MongoReplicaSet(dbpath=str(tmp_path), extra_args=["--no-such-option"])
    with pytest.raises(ServiceStartError, match="exited with status"):
        rs.start()
    assert not rs.is_running()


# -- Pub/Sub emulator ---------------------------------------------------------------------


def test_emulator_host_is_exported(pubsub_emulator_host):
    assert os.environ["PUBSUB_EMULATOR_HOST"] == pubsub_emulator_host
    assert pubsub_emulator_host.startswith("127.0.0.1:")


def test_emulator_publish_and_pull(pubsub_emulator_host, pubsub_project):
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    try:
        topic = publisher.topic_path(pubsub_project, "events")
        sub = subscriber.subscription_path(pubsub_project, "events-sub")
        publisher.create_topic(request={"name": topic}, timeout=10)
        subscriber.create_subscription(request={"name": sub, "topic": topic}, timeout=10)
        message_id = publisher.publish(topic, b"hello", kind="test").result(timeout=10)
        received = []
        deadline = time.monotonic() + 15
        while not received and time.monotonic() < deadline:
            try:
                resp = subscriber.pull(request={"subscription": sub, "max_messages": 10}, timeout=2)
            except gexc.DeadlineExceeded:
                continue
            received.extend(resp.received_messages)
        assert [m.message.message_id for m in received] == [message_id]
        assert received[0].message.data == b"hello"
        assert received[0].message.attributes["kind"] == "test"
        subscriber.acknowledge(
            request={"subscription": sub, "ack_ids": [m.ack_id for m in received]}, timeout=10
        )
    finally:
        subscriber.close()
        publisher.transport.close()


def _http_get(host: str, timeout: float) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}/", timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


def test_emulator_pause_and_resume(pubsub_emulator, pubsub_project):
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(pubsub_project, "paused")
    try:
        pubsub_emulator.pause()
        try:
            with pytest.raises(gexc.DeadlineExceeded):
                publisher.create_topic(request={"name": topic}, timeout=1, retry=None)
            with pytest.raises((urllib.error.URLError, TimeoutError)):
                _http_get(pubsub_emulator.host, timeout=0.5)
        finally:
            pubsub_emulator.resume()
        assert _http_get(pubsub_emulator.host, timeout=5).strip() == b"Ok"
        # Whether the timed-out create landed is unspecified; the emulator answers again.
        with contextlib.suppress(gexc.AlreadyExists):
            publisher.create_topic(request={"name": topic}, timeout=10)
        assert publisher.get_topic(request={"topic": topic}, timeout=10).name == topic
    finally:
        publisher.transport.close()


def test_emulator_retries_when_port_taken(monkeypatch, pubsub_emulator):
    taken = pubsub_emulator.port
    ports = iter([taken])
    real_free_port = emulator_module.free_port
    monkeypatch.setattr(emulator_module, "free_port", lambda: next(ports, None) or real_free_port())
    with PubSubEmulator() as other:
        assert other.port != taken
        assert _http_get(other.host, timeout=5).strip() == b"Ok"
        assert other.log_path is not None
        assert "BindException" in (other.log_path.parent / "pubsub-emulator-0.log").read_text()


def test_emulator_given_taken_port_fails_clearly(pubsub_emulator):
    with pytest.raises(ServiceStartError, match="could not bind"):
        PubSubEmulator(port=pubsub_emulator.port).start()
