"""The benchmark's environment: real services, fresh databases and topics, shared helpers.

Everything runs on 127.0.0.1: a throwaway single-node replica set (``MongoReplicaSet``) and the
Pub/Sub emulator (``PubSubEmulator``), both started once per run and stopped at the end.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from pymongo import MongoClient

from mongo_outbox import ensure_indexes, outbox_transaction
from mongo_outbox.testing import MongoReplicaSet, PubSubEmulator

PROJECT = "bench-project"
KEYS = 16
PAYLOAD_BYTES = 200
EVENT_TYPE = "BenchEvent"


def log(message: str) -> None:
    """Progress goes to stderr; stdout holds only the final table."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def key_of(i: int) -> str:
    return f"key-{i % KEYS:02d}"


def payload_of(i: int) -> dict[str, Any]:
    """A dict payload whose compact JSON encoding is exactly ``PAYLOAD_BYTES`` bytes."""
    head = {"id": i, "pad": ""}
    size = len(json.dumps(head, separators=(",", ":")).encode())
    return {"id": i, "pad": "x" * (PAYLOAD_BYTES - size)}


def payload_bytes(i: int) -> bytes:
    data = json.dumps(payload_of(i), separators=(",", ":")).encode()
    assert len(data) == PAYLOAD_BYTES
    return data


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def write_backlog(
    client: MongoClient[Any], database: str, n: int, *, per_tx: int = 1000, start: int = 0
) -> None:
    """Commit ``n`` pending events with ``outbox_transaction``, ``per_tx`` per transaction."""
    i = start
    end = start + n
    while i < end:
        stop = min(end, i + per_tx)
        with outbox_transaction(client, database=database) as tx:
            for j in range(i, stop):
                tx.emit(EVENT_TYPE, payload_of(j), key=key_of(j))
        i = stop


def write_indexes(client: MongoClient[Any], database: str, indexes: list[int], per_tx: int) -> None:
    """Commit the events numbered ``indexes`` (in that order), ``per_tx`` per transaction."""
    for at in range(0, len(indexes), per_tx):
        with outbox_transaction(client, database=database) as tx:
            for j in indexes[at : at + per_tx]:
                tx.emit(EVENT_TYPE, payload_of(j), key=key_of(j))


def pending_count(client: MongoClient[Any], database: str) -> int:
    return int(client[database].outbox.count_documents({"status": "pending"}))


def status_counts(client: MongoClient[Any], database: str) -> dict[str, int]:
    counts = {"pending": 0, "published": 0, "dead": 0}
    for row in client[database].outbox.aggregate(
        [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]
    ):
        counts[str(row["_id"])] = int(row["n"])
    return counts


@dataclass
class Subscription:
    """An ordered subscription on the emulator; pulls and acks to verify arrival."""

    client: pubsub_v1.SubscriberClient
    path: str

    def collect(self, expected: int, timeout: float = 300.0, quiet: float = 2.0) -> list[Any]:
        """Pull (and ack) until ``expected`` messages arrived and nothing more comes."""
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            if len(received) >= expected and time.monotonic() - last > quiet:
                break
            try:
                response = self.client.pull(
                    request={"subscription": self.path, "max_messages": 1000}, timeout=2.0
                )
            except (gexc.DeadlineExceeded, gexc.ServiceUnavailable):
                continue
            if not response.received_messages:
                continue
            last = time.monotonic()
            received.extend(m.message for m in response.received_messages)
            self.client.acknowledge(
                request={
                    "subscription": self.path,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
        return received


@dataclass
class Arrival:
    """What a subscription saw: counts and per-key order of the outbox event ids."""

    received: int
    distinct: int
    order_ok: bool

    def describe(self, expected: int) -> str:
        order = "per-key order ok" if self.order_ok else "PER-KEY ORDER BROKEN"
        return f"{self.distinct}/{expected} distinct received ({self.received} in all), {order}"


def check_arrival(messages: list[Any], ident: Callable[[Any], Any]) -> Arrival:
    """Count distinct messages and check that each key's ``ident`` values only increase."""
    last: dict[str, Any] = {}
    seen: set[Any] = set()
    order_ok = True
    for m in messages:
        value = ident(m)
        if value in seen:
            continue  # a redelivery; order is judged on first deliveries
        seen.add(value)
        previous = last.get(m.ordering_key)
        if previous is not None and value < previous:
            order_ok = False
        last[m.ordering_key] = value
    return Arrival(len(messages), len(seen), order_ok)


def event_id_of(message: Any) -> str:
    """The outbox event id (ObjectId hex sorts like the ids, i.e. in emit order)."""
    return str(message.attributes["outbox_event_id"])


def payload_id_of(message: Any) -> int:
    """The ``id`` inside a benchmark payload (raw messages carry no attributes)."""
    return int(json.loads(bytes(message.data))["id"])


@dataclass
class Bench:
    """Services plus shared clients; every resource it hands out is released by ``close``."""

    quick: bool
    mongo: MongoReplicaSet = field(default_factory=MongoReplicaSet)
    emulator: PubSubEmulator = field(default_factory=PubSubEmulator)
    client: MongoClient[Any] | None = None
    publisher_admin: pubsub_v1.PublisherClient | None = None
    subscriber: pubsub_v1.SubscriberClient | None = None
    notes: list[str] = field(default_factory=list)
    _cleanups: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        log("starting mongod (single-node replica set) ...")
        self.mongo.start()
        self._cleanups.callback(self.mongo.stop)
        log(f"mongod ready at {self.mongo.uri}; starting the Pub/Sub emulator ...")
        self.emulator.start()
        self._cleanups.callback(self.emulator.stop)
        os.environ["PUBSUB_EMULATOR_HOST"] = self.emulator.host
        log(f"emulator ready at {self.emulator.host}")
        self.client = MongoClient(self.mongo.uri, tz_aware=True)
        self._cleanups.callback(self.client.close)
        self.publisher_admin = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        self._cleanups.callback(self.subscriber.close)
        self._cleanups.callback(self._stop_processes)

    def close(self) -> None:
        self._cleanups.close()

    def __enter__(self) -> Bench:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mongo_client(self) -> MongoClient[Any]:
        assert self.client is not None
        return self.client

    # -- fresh resources -----------------------------------------------------------------

    @contextlib.contextmanager
    def database(self, label: str) -> Iterator[str]:
        """A fresh database with the outbox collections and indexes; dropped afterwards."""
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        ensure_indexes(self.mongo_client, name)
        try:
            yield name
        finally:
            with contextlib.suppress(Exception):
                self.mongo_client.drop_database(name)

    @contextlib.contextmanager
    def topic(self, label: str) -> Iterator[tuple[str, Subscription]]:
        """A fresh topic with one ordered subscription (as a real deployment would have)."""
        assert self.publisher_admin is not None
        assert self.subscriber is not None
        topic_id = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        topic_path = self.publisher_admin.topic_path(PROJECT, topic_id)
        sub_path = self.subscriber.subscription_path(PROJECT, f"{topic_id}-sub")
        self.publisher_admin.create_topic(name=topic_path)
        self.subscriber.create_subscription(
            request={"name": sub_path, "topic": topic_path, "enable_message_ordering": True}
        )
        try:
            yield topic_id, Subscription(self.subscriber, sub_path)
        finally:
            with contextlib.suppress(Exception):
                self.subscriber.delete_subscription(subscription=sub_path)
            with contextlib.suppress(Exception):
                self.publisher_admin.delete_topic(topic=topic_path)

    # -- subprocesses --------------------------------------------------------------------

    def relay_env(self, database: str, topic: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONGO_OUTBOX_")}
        env.update(
            MONGO_OUTBOX_MONGO_URI=self.mongo.uri,
            MONGO_OUTBOX_DATABASE=database,
            MONGO_OUTBOX_PROJECT=PROJECT,
            MONGO_OUTBOX_DEFAULT_TOPIC=topic,
            PUBSUB_EMULATOR_HOST=self.emulator.host,
        )
        return env

    def spawn(self, argv: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a subprocess that ``close`` is sure to stop."""
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **kwargs)
        self._procs.append(proc)
        return proc

    def stop_process(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
        """SIGTERM ``proc`` (its own pid only), SIGKILL it after ``timeout``; return its code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)
        return int(proc.returncode)

    def _stop_processes(self) -> None:
        for proc in list(self._procs):
            self.stop_process(proc, timeout=5.0)

    # -- machine -------------------------------------------------------------------------

    def machine(self) -> list[tuple[str, str]]:
        model = "?"
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo", encoding="utf-8"):  # noqa: SIM115
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        build = self.mongo_client.admin.command("buildInfo")
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        nproc = f"{affinity}" if affinity is not None else str(os.cpu_count())
        mem = "?"
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in open("/proc/meminfo", encoding="utf-8"):  # noqa: SIM115
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break

        def version(dist: str) -> str:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return "?"

        return [
            ("nproc", nproc),
            ("cpu", model),
            ("memory", mem),
            ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
            ("pymongo", version("pymongo")),
            ("google-cloud-pubsub", version("google-cloud-pubsub")),
            ("grpcio", version("grpcio")),
            ("mongo-outbox", f"{version('mongo-outbox')} ({_git_revision()})"),
            ("mongod", str(build.get("version", "?"))),
        ]


def _git_revision() -> str:
    """The project's commit, and whether mongo_outbox/ differs from it (read-only git calls;
    none with MONGO_OUTBOX_BENCH_NO_GIT set)."""
    if os.environ.get("MONGO_OUTBOX_BENCH_NO_GIT"):
        return "git not asked"
    root = str(Path(__file__).resolve().parent.parent)
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", root, "diff", "--quiet", "HEAD", "--", "mongo_outbox"],
            capture_output=True,
            timeout=10,
            check=False,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return "git ?"
    return f"git {head}" + (" + uncommitted mongo_outbox/ changes" if changed else "")


class RelayInThread:
    """``Relay.run`` in a daemon thread for the span of a ``with`` block (then stopped, joined)."""

    def __init__(self, run: Callable[[threading.Event], None]) -> None:
        self._run = run
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._target, name="bench-relay", daemon=True)

    def _target(self) -> None:
        try:
            self._run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> RelayInThread:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_event.set()
        # The relay must be gone before its client is closed, even if Ctrl-C lands here.
        interrupted: KeyboardInterrupt | None = None
        deadline = time.monotonic() + 60
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                self.thread.join(timeout=0.5)
            except KeyboardInterrupt as interrupt:
                interrupted = interrupt
        if interrupted is not None:
            raise interrupted
        if self.thread.is_alive():
            log("warning: the relay thread did not stop within 60 s")
        if self.error is not None and exc_info[0] is None:
            raise RuntimeError(f"relay thread failed: {self.error!r}") from self.error


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so cleanup runs for both.

    SIGINT is set explicitly because a shell may start background jobs with it ignored.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def ignore_interrupts() -> None:
    """While stopping services: a second Ctrl-C must not leave processes behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float) -> float:
    """Poll ``condition`` every ``interval`` s; return the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g} s")
        time.sleep(interval)
