"""`mongo-outbox relay` as a real process: env configuration, --once, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import wait_for

from mongo_outbox import outbox_transaction
from mongo_outbox._admin import OutboxAdmin
from mongo_outbox._store import OutboxStore


def _env(mongodb_uri: str, db: str, project: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MONGO_OUTBOX_MONGO_URI=mongodb_uri,
        MONGO_OUTBOX_DATABASE=db,
        MONGO_OUTBOX_PROJECT=project,
        **extra,
    )
    return env


def _relay(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mongo_outbox.cli", "relay", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_once_publishes_pending_and_exits_zero(client, db_name, pubsub, mongodb_uri):
    topic, sub = pubsub.topic()
    with outbox_transaction(client, database=db_name) as tx:
        ids = [tx.emit("E", f"{i}".encode(), key="k") for i in range(20)]
    env = _env(mongodb_uri, db_name, pubsub.project, MONGO_OUTBOX_DEFAULT_TOPIC=topic)
    proc = _relay(env, "--once")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    got = sub.pull_until(20)
    assert [m.attributes["outbox_event_id"] for m in got] == [str(i) for i in ids]
    assert OutboxAdmin(client[db_name]).counts()["pending"] == 0


def test_sigterm_finishes_checkpoints_and_exits_zero(client, db_name, pubsub, mongodb_uri):
    topic, sub = pubsub.topic()
    env = _env(mongodb_uri, db_name, pubsub.project, MONGO_OUTBOX_DEFAULT_TOPIC=topic)
    proc = _relay(env, "--name", "svc")
    try:
        with outbox_transaction(client, database=db_name) as tx:
            tx.emit("E", b"x", key="k")
        sub.pull_until(1, timeout=60)
        wait_for(lambda: OutboxAdmin(client[db_name]).counts()["published"] == 1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out
    state = OutboxStore(client[db_name]).load_state("svc")
    assert state.get("resume_token") is not None
    assert state.get("checkpoint_at") is not None


def test_unknown_topic_without_default_is_dead_with_reason(client, db_name, pubsub, mongodb_uri):
    with outbox_transaction(client, database=db_name) as tx:
        event_id = tx.emit("E", b"x")
    proc = _relay(_env(mongodb_uri, db_name, pubsub.project, MONGO_OUTBOX_ONCE="1"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    doc = client[db_name].outbox.find_one({"_id": event_id})
    assert doc["status"] == "dead"
    assert "--default-topic" in doc["last_error"]


def test_create_topics_flag(client, db_name, pubsub, mongodb_uri):
    with outbox_transaction(client, database=db_name) as tx:
        tx.emit("E", b"x", topic="created-on-demand")
    env = _env(mongodb_uri, db_name, pubsub.project, MONGO_OUTBOX_CREATE_TOPICS="true")
    proc = _relay(env, "--once")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert OutboxAdmin(client[db_name]).counts()["published"] == 1
    topics = [
        t.name for t in pubsub.publisher_client.list_topics(project=f"projects/{pubsub.project}")
    ]
    assert f"projects/{pubsub.project}/topics/created-on-demand" in topics


def test_demo_runs_the_whole_flow(pubsub_emulator_host, mongodb_uri):
    env = dict(os.environ, MONGODB_URI=mongodb_uri, PUBSUB_EMULATOR_HOST=pubsub_emulator_host)
    result = subprocess.run(
        [sys.executable, "-m", "mongo_outbox.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("received OrderCreated") == 6
    assert "'pending': 0, 'published': 6" in result.stdout
