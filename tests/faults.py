"""Fault-injection helpers: relay processes to kill, a writer that never stops writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from mongo_outbox import outbox_transaction


class RelayProcess:
    """``mongo-outbox relay`` in its own process, its output kept in a file."""

    def __init__(self, env: dict[str, str], args: Sequence[str] = ()) -> None:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            "w+", prefix="relay-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mongo_outbox.cli", "relay", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def close(self) -> None:
        if self.alive():
            self.kill()
        self.log.close()
        os.unlink(self.log.name)


def report(name: str, **figures: Any) -> None:
    """Print a fault test's figures (run pytest with -s to see them)."""
    print(f"\n[fault] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def relay_env(uri: str, db: str, project: str, topic: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MONGO_OUTBOX_MONGO_URI=uri,
        MONGO_OUTBOX_DATABASE=db,
        MONGO_OUTBOX_PROJECT=project,
        MONGO_OUTBOX_DEFAULT_TOPIC=topic,
        MONGO_OUTBOX_LEASE_TTL="2",
        MONGO_OUTBOX_LOG_LEVEL="INFO",
    )
    env.update(extra)  # may override the defaults above
    return env


class Writer(threading.Thread):
    """Writes one event per transaction over a few keys until stopped, riding out errors.

    What was committed is read back from the outbox at the end (a commit whose reply was lost
    may still have committed), so ``attempted`` only counts tries.
    """

    def __init__(
        self, client: MongoClient[Any], db: str, keys: int = 8, pause: float = 0.002
    ) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.db = db
        self.keys = keys
        self.pause = pause
        self.halt = threading.Event()
        self.attempted = 0
        self.errors = 0

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            key = f"k{n % self.keys}"
            try:
                with outbox_transaction(self.client, database=self.db) as tx:
                    self.client[self.db].orders.insert_one({"n": n}, session=tx.session)
                    tx.emit("OrderCreated", {"n": n, "key": key}, key=key)
                n += 1
            except PyMongoError:
                self.errors += 1
                time.sleep(0.1)
            self.attempted += 1
            time.sleep(self.pause)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=60)


def committed_ids(client: MongoClient[Any], db: str) -> dict[str, dict[str, Any]]:
    """Every outbox event in the database, by hex id."""
    return {str(d["_id"]): d for d in client[db].outbox.find({}, {"payload": 0})}


def check_delivery(committed: dict[str, dict[str, Any]], received: list[Any]) -> tuple[int, int]:
    """Assert nothing committed was lost and per-key order of first arrivals held.

    Returns (unique delivered, duplicates).
    """
    seen: set[str] = set()
    per_key: dict[str, list[str]] = {}
    duplicates = 0
    for msg in received:
        event_id = msg.attributes["outbox_event_id"]
        if event_id in seen:
            duplicates += 1
            continue
        seen.add(event_id)
        per_key.setdefault(msg.ordering_key, []).append(event_id)
    missing = set(committed) - seen
    assert not missing, f"{len(missing)} committed events never arrived"
    for key, ids in per_key.items():
        # Writers emit one key sequentially, so commit order is _id order within a key.
        assert ids == sorted(ids), f"key {key} arrived out of order"
    return len(seen), duplicates
