"""The scenarios. Each runs one round on fresh databases and topics and returns its metrics."""

from __future__ import annotations

import contextlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import naive_relay
import psutil
from bench_env import (
    EVENT_TYPE,
    KEYS,
    PROJECT,
    Bench,
    RelayInThread,
    check_arrival,
    event_id_of,
    key_of,
    log,
    payload_bytes,
    payload_id_of,
    payload_of,
    pending_count,
    percentile,
    status_counts,
    utcnow,
    wait_until,
    write_backlog,
    write_indexes,
)
from bson import ObjectId
from google.pubsub_v1 import PublishRequest
from pymongo import ASCENDING, MongoClient
from pymongo.write_concern import WriteConcern

from mongo_outbox import PubSubPublisher, Relay, RelayConfig, ensure_indexes, outbox_transaction
from mongo_outbox.publishers._pubsub import make_gapic_client

Metrics = dict[str, float]
MB = 1_000_000
US = 1_000_000  # microseconds per second


@dataclass(frozen=True)
class Config:
    n: int
    rounds: int
    memory_n: int
    restart_n: int
    latency_seconds: float
    latency_rate: float
    latency_relay: str  # "thread" or "process"
    stream_relay: str  # "thread" or "process"
    stream_writers: int
    drain_relay: str  # "thread" (Relay.run_once in this process) or "process" (relay --once)
    group_n: int
    group_partitions: int
    write_tx: int
    write_block: int
    verify: bool


class BenchError(RuntimeError):
    """A round could not be measured (lost events, a failed subprocess...)."""


def _verify(bench: Bench, label: str, sub: Any, expected: int, ident: Callable[[Any], Any]) -> None:
    started = time.monotonic()
    arrival = check_arrival(sub.collect(expected), ident)
    text = f"{label}: subscription {arrival.describe(expected)}"
    log(f"  verified {text} (pulled in {time.monotonic() - started:.1f} s)")
    bench.notes.append(f"verified {text}")
    if arrival.distinct != expected or not arrival.order_ok:
        raise BenchError(f"{label}: {arrival.describe(expected)}")


def _check_published(bench: Bench, database: str, expected: int, label: str) -> None:
    counts = status_counts(bench.mongo_client, database)
    if counts["published"] != expected or counts["pending"] or counts["dead"]:
        raise BenchError(f"{label}: outbox counts {counts}, expected {expected} published")


def _mongo_outbox_exe() -> str:
    beside = Path(sys.executable).parent / "mongo-outbox"
    if beside.exists():
        return str(beside)
    found = shutil.which("mongo-outbox")
    if found is None:
        raise BenchError("the mongo-outbox console script is not installed")
    return found


def _relay(
    client: MongoClient[Any], database: str, topic: str, **config: Any
) -> tuple[Relay, PubSubPublisher]:
    publisher = PubSubPublisher(PROJECT)
    settings = RelayConfig(database=database, default_topic=topic, **config)
    return Relay(client, publisher, settings), publisher


# -- throughput ----------------------------------------------------------------------------


def raw(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """The stock high-level client publishing N messages over 16 keys: the ceiling."""
    with bench.topic("raw") as (topic, sub):
        publisher = naive_relay.make_publisher()
        path = publisher.topic_path(PROJECT, topic)
        data = [payload_bytes(i) for i in range(cfg.n)]
        keys = [key_of(i) for i in range(cfg.n)]
        try:
            started = time.perf_counter()
            futures = [publisher.publish(path, data[i], ordering_key=keys[i]) for i in range(cfg.n)]
            for future in futures:
                future.result(timeout=300)
            elapsed = time.perf_counter() - started
        finally:
            publisher.stop()
        if cfg.verify and rnd == 0:
            _verify(bench, "raw", sub, cfg.n, payload_id_of)
    return {"raw": cfg.n / elapsed}


_PB_REQUEST: Any = PublishRequest.pb()
BROKER_BATCH = 1000  # messages per Publish request, as the relay sends them


def broker(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """The broker's own limit: N messages shaped as the relay's (200 bytes, 16 keys, the three
    outbox_* attributes), as raw protobuf Publish requests of 1,000, built inside the timing
    and sent one after another through the generated (GAPIC) client, as the relay sends a
    topic's requests. No MongoDB. CPU per message is this process's (only this thread works).
    """
    with bench.topic("broker") as (topic, sub):
        client = make_gapic_client()
        path = client.topic_path(PROJECT, topic)
        created = utcnow().replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"
        data = [payload_bytes(i) for i in range(cfg.n)]
        keys = [key_of(i) for i in range(cfg.n)]
        ids = [str(ObjectId()) for _ in range(cfg.n)]

        def request(lo: int, hi: int) -> Any:
            # The cheapest build known (as PubSubPublisher does it): messages added in place,
            # attributes set one by one.
            req = _PB_REQUEST(topic=path)
            add = req.messages.add
            for i in range(lo, hi):
                attributes = add(data=data[i], ordering_key=keys[i]).attributes
                attributes["outbox_event_id"] = ids[i]
                attributes["outbox_event_type"] = EVENT_TYPE
                attributes["outbox_created_at"] = created
            return req

        try:
            # Untimed: the channel's connection and the topic's first request.
            warm = _PB_REQUEST(topic=path)
            warm.messages.add(data=b"warm-up")
            client.publish(request=PublishRequest.wrap(warm), retry=None, timeout=60)
            cpu0 = _cpu_self()
            started = time.perf_counter()
            for lo in range(0, cfg.n, BROKER_BATCH):
                req = request(lo, min(cfg.n, lo + BROKER_BATCH))
                client.publish(request=PublishRequest.wrap(req), retry=None, timeout=60)
            elapsed = time.perf_counter() - started
            cpu = _cpu_self() - cpu0
        finally:
            client.transport.close()
        if cfg.verify and rnd == 0:
            messages = [m for m in sub.collect(cfg.n + 1) if m.data != b"warm-up"]
            arrival = check_arrival(messages, payload_id_of)
            text = f"broker: subscription {arrival.describe(cfg.n)}"
            log(f"  verified {text}")
            bench.notes.append(f"verified {text}")
            if arrival.distinct != cfg.n or not arrival.order_ok:
                raise BenchError(text)
    return {"broker": cfg.n / elapsed, "broker_cpu": cpu / cfg.n * US}


def naive(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """The hand-rolled polling relay of naive_relay.py draining N pending events."""
    client = bench.mongo_client
    with bench.database("naive") as db, bench.topic("naive") as (topic, sub):
        write_backlog(client, db, cfg.n)
        publisher = naive_relay.make_publisher()
        path = publisher.topic_path(PROJECT, topic)
        try:
            started = time.perf_counter()
            count = naive_relay.drain(client[db].outbox, publisher, path)
            elapsed = time.perf_counter() - started
        finally:
            publisher.stop()
        if count != cfg.n:
            raise BenchError(f"naive relay published {count} of {cfg.n}")
        _check_published(bench, db, cfg.n, "naive")
        if cfg.verify and rnd == 0:
            _verify(bench, "naive", sub, cfg.n, event_id_of)
    return {"naive": cfg.n / elapsed}


def _cpu_self() -> float:
    """CPU seconds (user + system) of this whole process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_children() -> float:
    """CPU seconds (user + system) of the children this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(proc: psutil.Process) -> float:
    """CPU seconds (user + system, its children included) of a running process."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def drain(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """The relay draining N pending events: ``Relay.run_once`` in this process (default), or
    ``mongo-outbox relay --once`` as its own process (``--drain-relay process``).

    CPU per event: in this process, the process's CPU while ``run_once`` runs (the calling
    thread is the relay's own; nothing else here works meanwhile); as a process, its CPU from
    the 'acquired the lease' log line (imports and connecting done) to its exit.
    """
    client = bench.mongo_client
    with bench.database("drain") as db, bench.topic("drain") as (topic, sub):
        write_backlog(client, db, cfg.n)
        if cfg.drain_relay == "process":
            published, elapsed, cpu, started_wall, ended_wall = _drain_process(bench, db, topic)
        else:
            published, elapsed, cpu, started_wall, ended_wall = _drain_in_process(bench, db, topic)
        if published is not None and published != cfg.n:
            raise BenchError(f"the relay published {published} of {cfg.n}")
        _check_published(bench, db, cfg.n, "drain")
        last = client[db].outbox.find_one({}, {"published_at": 1}, sort=[("published_at", -1)])
        if last is None:
            raise BenchError("drain: no published_at")
        tail = (ended_wall - last["published_at"]).total_seconds()
        busy = (last["published_at"] - started_wall).total_seconds()
        if cfg.verify and rnd == 0:
            _verify(bench, "drain", sub, cfg.n, event_id_of)
    return {
        "drain": cfg.n / elapsed,
        "drain_busy": cfg.n / busy,
        "drain_tail": tail,
        "drain_cpu": cpu / cfg.n * US,
        "drain_cpu_share": cpu / elapsed,
    }


def _drain_in_process(
    bench: Bench, db: str, topic: str, **config: Any
) -> tuple[int, float, float, Any, Any]:
    relay_client: MongoClient[Any] = MongoClient(bench.mongo.uri, tz_aware=True)
    relay_client.admin.command("ping")
    relay, publisher = _relay(relay_client, db, topic, **config)
    try:
        started_wall = utcnow()
        cpu0 = _cpu_self()
        started = time.perf_counter()
        published = relay.run_once()
        elapsed = time.perf_counter() - started
        cpu = _cpu_self() - cpu0
        ended_wall = utcnow()
    finally:
        publisher.close()
        relay_client.close()
    return published, elapsed, cpu, started_wall, ended_wall


def _drain_process(bench: Bench, db: str, topic: str) -> tuple[None, float, float, Any, Any]:
    """``mongo-outbox relay --once``: timed and measured from 'acquired the lease' to exit."""
    lease: list[tuple[float, float, Any]] = []
    lines: list[str] = []
    children0 = _cpu_children()
    proc = bench.spawn(
        [_mongo_outbox_exe(), "relay", "--once"],
        bench.relay_env(db, topic),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ps = psutil.Process(proc.pid)

    def read_log() -> None:
        assert proc.stderr is not None
        for raw_line in proc.stderr:
            line = raw_line.decode(errors="replace").rstrip()
            lines.append(line)
            if not lease and "acquired the lease" in line:
                with contextlib.suppress(psutil.Error):
                    lease.append((time.perf_counter(), _cpu_of(ps), utcnow()))

    reader = threading.Thread(target=read_log, name="bench-relay-log", daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=1800)
        ended = time.perf_counter()
        ended_wall = utcnow()
    finally:
        bench.stop_process(proc)
        reader.join(timeout=10)
    if code != 0:
        raise BenchError(f"relay --once exited with {code}: {lines[-10:]}")
    if not lease:
        raise BenchError(f"no 'acquired the lease' line in the relay's log: {lines[-10:]}")
    started, cpu_at_lease, started_wall = lease[0]
    cpu = _cpu_children() - children0 - cpu_at_lease
    return None, ended - started, cpu, started_wall, ended_wall


def _warm_relay(bench: Bench, db: str) -> None:
    """Commit one event and wait until the running relay has published it."""
    write_backlog(bench.mongo_client, db, 1, start=10**9)
    wait_until(
        lambda: status_counts(bench.mongo_client, db)["published"] == 1, timeout=60, interval=0.05
    )


def stream(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """A caught-up relay while N events are committed 100 per transaction.

    Each writer thread owns a share of the keys, so per-key order is still one writer's order.
    CPU per event: the relay process's CPU from the first commit until nothing is pending (as a
    thread: this process's CPU less the writer threads' and the main thread's).
    """
    client = bench.mongo_client
    with bench.database("stream") as db, bench.topic("stream") as (topic, sub):
        with _relay_running(bench, cfg, db, topic, mode=cfg.stream_relay) as relay_cpu:
            shares = [
                [j for j in range(cfg.n) if (j % KEYS) % cfg.stream_writers == w]
                for w in range(cfg.stream_writers)
            ]
            writer_cpu: list[float] = []

            def write_share(share: list[int]) -> None:
                try:
                    write_indexes(client, db, share, 100)
                finally:
                    writer_cpu.append(time.thread_time())

            writers = [threading.Thread(target=write_share, args=(share,)) for share in shares]
            cpu0 = relay_cpu()
            started = time.perf_counter()
            for w in writers:
                w.start()
            for w in writers:
                w.join()
            written = time.perf_counter()
            done = wait_until(lambda: pending_count(client, db) == 0, 600, 0.05)
            cpu = relay_cpu() - cpu0
            if cfg.stream_relay != "process":
                cpu -= sum(writer_cpu)
        _check_published(bench, db, cfg.n + 1, "stream")
        if cfg.verify and rnd == 0:
            _verify(bench, "stream", sub, cfg.n + 1, event_id_of)
    return {
        "stream": cfg.n / (done - started),
        "stream_writer": cfg.n / (written - started),
        "stream_cpu": cpu / cfg.n * US,
        "stream_cpu_share": cpu / (done - started),
    }


# -- latency -------------------------------------------------------------------------------


@contextlib.contextmanager
def _relay_running(
    bench: Bench, cfg: Config, db: str, topic: str, mode: str | None = None
) -> Iterator[Callable[[], float]]:
    """A caught-up relay: ``Relay.run`` in a thread, or ``mongo-outbox relay`` as a process.

    Yields a function giving the relay's CPU seconds so far: the process's own (its children
    included); for a thread, this process's CPU less the calling (main) thread's.
    """
    if (mode or cfg.latency_relay) == "process":
        proc = bench.spawn(
            [_mongo_outbox_exe(), "relay"],
            bench.relay_env(db, topic),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        ps = psutil.Process(proc.pid)
        try:
            _warm_relay(bench, db)
            yield lambda: _cpu_of(ps)
        finally:
            bench.stop_process(proc)
        return
    relay_client: MongoClient[Any] = MongoClient(bench.mongo.uri, tz_aware=True)
    relay, publisher = _relay(relay_client, db, topic)
    try:
        with RelayInThread(relay.run):
            _warm_relay(bench, db)
            yield lambda: _cpu_self() - time.thread_time()
    finally:
        publisher.close()
        relay_client.close()


def latency(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """One event per transaction at a steady rate; commit-to-publish latency percentiles."""
    client = bench.mongo_client
    count = max(1, int(cfg.latency_rate * cfg.latency_seconds))
    with bench.database("latency") as db, bench.topic("latency") as (topic, _sub):
        ids: list[ObjectId] = []
        with _relay_running(bench, cfg, db, topic):
            interval = 1.0 / cfg.latency_rate
            started = time.perf_counter()
            for i in range(count):
                delay = started + i * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                with outbox_transaction(client, database=db) as tx:
                    ids.append(tx.emit(EVENT_TYPE, payload_of(i), key=key_of(i)))
            written = time.perf_counter() - started
            wait_until(lambda: pending_count(client, db) == 0, 600, 0.05)
        lat = [
            (doc["published_at"] - doc["created_at"]).total_seconds() * 1000
            for doc in client[db].outbox.find(
                {"_id": {"$in": ids}}, {"created_at": 1, "published_at": 1}
            )
        ]
    if len(lat) != count:
        raise BenchError(f"latency: {len(lat)} of {count} events published")
    return {
        "latency_p50": percentile(lat, 50),
        "latency_p99": percentile(lat, 99),
        "latency_max": max(lat),
        "latency_rate": count / written,
    }


# -- write overhead ------------------------------------------------------------------------

_MAJORITY = WriteConcern("majority")


def write(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """Per-transaction time: outbox_transaction vs plain transactions with one or two inserts."""
    client = bench.mongo_client
    with bench.database("write") as db:
        database = client[db]
        orders = database.create_collection("orders")
        # The floor's second insert goes to a collection shaped like the outbox: same kind of
        # document, same (status, _id) index, so the ratio isolates the library's own cost.
        events = database.create_collection("events")
        events.create_index([("status", ASCENDING), ("_id", ASCENDING)])
        pad = "y" * 150

        def order(i: int) -> dict[str, Any]:
            return {"i": i, "customer": key_of(i), "pad": pad}

        def event(i: int) -> dict[str, Any]:
            return {
                "_id": ObjectId(),
                "type": EVENT_TYPE,
                "topic": None,
                "key": key_of(i),
                "payload": payload_bytes(i),
                "attributes": {},
                "created_at": utcnow(),
                "status": "pending",
                "attempts": 0,
            }

        def with_outbox(i: int) -> None:
            with outbox_transaction(client, database=db) as tx:
                orders.insert_one(order(i), session=tx.session)
                tx.emit(EVENT_TYPE, payload_of(i), key=key_of(i))

        def plain_one(i: int) -> None:
            with client.start_session() as session:
                session.start_transaction(write_concern=_MAJORITY)
                orders.insert_one(order(i), session=session)
                session.commit_transaction()

        def plain_two(i: int) -> None:
            with client.start_session() as session:
                session.start_transaction(write_concern=_MAJORITY)
                orders.insert_one(order(i), session=session)
                events.insert_one(event(i), session=session)
                session.commit_transaction()

        variants: list[tuple[str, Callable[[int], None]]] = [
            ("outbox", with_outbox),
            ("one", plain_one),
            ("two", plain_two),
        ]
        times: dict[str, list[float]] = {name: [] for name, _ in variants}
        i = 0
        for _name, fn in variants:  # warm-up, not measured
            for _ in range(min(50, cfg.write_block)):
                fn(i)
                i += 1
        blocks = max(1, cfg.write_tx // cfg.write_block)
        for b in range(blocks):
            # Rotate the order so no variant always runs first (or last) in a block.
            for name, fn in variants[b % 3 :] + variants[: b % 3]:
                bucket = times[name]
                for _ in range(cfg.write_block):
                    t0 = time.perf_counter()
                    fn(i)
                    bucket.append(time.perf_counter() - t0)
                    i += 1
    med = {name: statistics.median(values) for name, values in times.items()}
    return {
        "write_outbox": 1 / med["outbox"],
        "write_one": 1 / med["one"],
        "write_two": 1 / med["two"],
        "write_ratio": med["outbox"] / med["two"],
    }


# -- relay process: memory and restart -----------------------------------------------------


def _vm_hwm(pid: int) -> int:
    """Peak RSS (VmHWM) of ``pid`` in bytes, 0 if unreadable."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def memory(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """Peak RSS of ``mongo-outbox relay --once`` draining a large backlog."""
    client = bench.mongo_client
    with bench.database("memory") as db, bench.topic("memory") as (topic, _sub):
        log(f"  writing a backlog of {cfg.memory_n} events ...")
        write_backlog(client, db, cfg.memory_n)
        with tempfile.TemporaryFile() as errors:
            started = time.perf_counter()
            proc = bench.spawn(
                [_mongo_outbox_exe(), "relay", "--once"],
                bench.relay_env(db, topic),
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
            peak = 0
            try:
                ps = psutil.Process(proc.pid)
                deadline = started + 1800
                while proc.poll() is None:
                    with contextlib.suppress(psutil.Error):
                        rss = ps.memory_info().rss
                        rss += sum(c.memory_info().rss for c in ps.children(recursive=True))
                        peak = max(peak, rss, _vm_hwm(proc.pid))
                    if time.perf_counter() > deadline:
                        raise BenchError("relay --once did not finish within 30 minutes")
                    time.sleep(0.05)
                elapsed = time.perf_counter() - started
            finally:
                code = bench.stop_process(proc)
            if code != 0:
                errors.seek(0)
                tail = errors.read().decode(errors="replace")[-2000:]
                raise BenchError(f"relay --once exited with {code}:\n{tail}")
        _check_published(bench, db, cfg.memory_n, "memory")
    return {"memory_peak": peak / MB, "memory_rate": cfg.memory_n / elapsed}


def restart(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """Launch ``mongo-outbox relay`` on a backlog: time to the lease and to the first publish."""
    client = bench.mongo_client
    with bench.database("restart") as db, bench.topic("restart") as (topic, _sub):
        log(f"  writing a backlog of {cfg.restart_n} events ...")
        write_backlog(client, db, cfg.restart_n)
        outbox = client[db].outbox
        lease_at: list[float] = []
        lines: list[str] = []
        started = time.perf_counter()
        proc = bench.spawn(
            [_mongo_outbox_exe(), "relay"],
            bench.relay_env(db, topic),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def read_log() -> None:
            assert proc.stderr is not None
            for raw_line in proc.stderr:
                now = time.perf_counter()
                line = raw_line.decode(errors="replace").rstrip()
                lines.append(line)
                if not lease_at and "acquired the lease" in line:
                    lease_at.append(now)

        reader = threading.Thread(target=read_log, name="bench-relay-log", daemon=True)
        reader.start()
        try:

            def first_published() -> bool:
                if proc.poll() is not None:
                    raise BenchError(f"relay exited with {proc.returncode}: {lines[-10:]}")
                return outbox.find_one({"status": "published"}, {"_id": 1}) is not None

            first = wait_until(first_published, timeout=120, interval=0.01)
        finally:
            bench.stop_process(proc)
            reader.join(timeout=10)
        if not lease_at:
            raise BenchError(f"no 'acquired the lease' line in the relay's log: {lines[-10:]}")
    return {"restart_first": first - started, "restart_lease": lease_at[0] - started}


# -- relay groups --------------------------------------------------------------------------

_PARTITIONS_FLAG: list[bool] = []


def _supports_partitions() -> bool:
    """Whether ``mongo-outbox relay`` takes ``--partitions`` (asked once per run)."""
    if not _PARTITIONS_FLAG:
        out = subprocess.run(
            [_mongo_outbox_exe(), "relay", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
        _PARTITIONS_FLAG.append("--partitions" in out)
    return _PARTITIONS_FLAG[0]


@dataclass(frozen=True)
class GroupRun:
    rate: float  # events/s from launch until all are published
    busy_rate: float  # events/s from the first published event until all are
    first: float  # seconds from launch to the first published event
    cpu: float  # CPU µs per event of all relays, from their start-up line to the end


class _RelayLog:
    """Reads a relay process's stderr: keeps its tail, and its CPU at the start-up line
    (`relaying ...`: imports done and MongoDB connected, nothing relayed yet)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.ps = psutil.Process(proc.pid)
        self.lines: list[str] = []
        self.cpu_ready: float | None = None
        self.thread = threading.Thread(target=self._read, name="bench-relay-log", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw_line in self.proc.stderr:
            line = raw_line.decode(errors="replace").rstrip()
            self.lines = [*self.lines[-50:], line]
            if self.cpu_ready is None and "relaying " in line:
                with contextlib.suppress(psutil.Error):
                    self.cpu_ready = _cpu_of(self.ps)


def _group_round(
    bench: Bench, cfg: Config, relays: int, partitions: int | None, verify: bool
) -> GroupRun:
    """``relays`` processes of ``mongo-outbox relay --name bench [--partitions P]`` launched at
    once on a backlog of ``group_n`` events; timed until the outbox counts them all published.
    """
    client = bench.mongo_client
    n = cfg.group_n
    with bench.database("group") as db, bench.topic("group") as (topic, sub):
        write_backlog(client, db, n)
        if partitions is not None:
            # As a deployment would: `mongo-outbox init --partitions P` before the relays.
            ensure_indexes(client, db, partitions=partitions)
        outbox = client[db].outbox
        argv = [_mongo_outbox_exe(), "relay", "--name", "bench"]
        if partitions is not None:
            argv += ["--partitions", str(partitions)]
        logs: list[_RelayLog] = []
        try:
            started = time.perf_counter()
            for _ in range(relays):
                proc = bench.spawn(
                    argv,
                    bench.relay_env(db, topic),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                logs.append(_RelayLog(proc))
            first: float | None = None
            deadline = started + 1800
            while True:
                for i, relay_log in enumerate(logs):
                    if relay_log.proc.poll() is not None:
                        tail = "\n".join(relay_log.lines[-10:])
                        raise BenchError(
                            f"relay {i} exited with {relay_log.proc.returncode}:\n{tail}"
                        )
                published = outbox.count_documents({"status": "published"})
                now = time.perf_counter()
                if first is None and published:
                    first = now
                if published >= n:
                    cpu_done = [_cpu_of(relay_log.ps) for relay_log in logs]
                    done = now
                    break
                if now > deadline:
                    raise BenchError(f"group: {published} of {n} published after 30 minutes")
                time.sleep(0.05)
        finally:
            codes = [bench.stop_process(relay_log.proc) for relay_log in logs]
            for relay_log in logs:
                relay_log.thread.join(timeout=10)
        if any(codes):
            raise BenchError(f"group: relays exited with {codes}")
        _check_published(bench, db, n, "group")
        assert first is not None
        missing = [i for i, relay_log in enumerate(logs) if relay_log.cpu_ready is None]
        if missing:
            raise BenchError(f"group: no start-up line ('relaying ...') from relays {missing}")
        cpu = sum(
            c - (relay_log.cpu_ready or 0.0) for c, relay_log in zip(cpu_done, logs, strict=True)
        )
        if verify:
            _verify(bench, f"group of {relays}", sub, n, event_id_of)
    return GroupRun(
        rate=n / (done - started),
        busy_rate=n / max(done - first, 1e-9),
        first=first - started,
        cpu=cpu / n * US,
    )


def group(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """Aggregate drain rate of a relay group: 1, 2 and 4 ``mongo-outbox relay --name bench
    --partitions P`` processes on one outbox, and one relay without partitions (today's).
    """
    metrics: Metrics = {}
    today = _group_round(bench, cfg, 1, None, verify=False)
    metrics.update(
        group_p1=today.rate,
        group_busy_p1=today.busy_rate,
        group_first_p1=today.first,
        group_cpu_p1=today.cpu,
    )
    if not _supports_partitions():
        note = "group: `mongo-outbox relay` has no --partitions yet: only today's relay measured"
        if note not in bench.notes:
            bench.notes.append(note)
        return metrics
    p = cfg.group_partitions
    for relays in (1, 2, 4):
        run = _group_round(bench, cfg, relays, p, verify=cfg.verify and rnd == 0 and relays == 4)
        metrics[f"group_{relays}"] = run.rate
        metrics[f"group_busy_{relays}"] = run.busy_rate
        metrics[f"group_first_{relays}"] = run.first
        metrics[f"group_cpu_{relays}"] = run.cpu
    metrics["group_ratio"] = metrics["group_1"] / metrics["group_p1"]
    return metrics


def formats(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """``Relay.run_once`` on N pending events in the outbox format and in the CloudEvents one,
    one after the other in this process (which goes first alternates by round)."""
    metrics: Metrics = {}
    order = ["outbox", "cloudevents"] if rnd % 2 == 0 else ["cloudevents", "outbox"]
    for fmt in order:
        with bench.database(f"fmt-{fmt}") as db, bench.topic(f"fmt-{fmt}") as (topic, _):
            write_backlog(bench.mongo_client, db, cfg.n)
            published, elapsed, cpu, _, _ = _drain_in_process(bench, db, topic, message_format=fmt)
            if published != cfg.n:
                raise BenchError(f"formats: the relay published {published} of {cfg.n}")
        metrics[f"formats_{fmt}"] = cfg.n / elapsed
        metrics[f"formats_cpu_{fmt}"] = cpu / cfg.n * US
    metrics["formats_ratio"] = metrics["formats_cpu_cloudevents"] / metrics["formats_cpu_outbox"]
    return metrics


# -- consume -------------------------------------------------------------------------------


def _publish_for_consumers(topic: str, count: int) -> None:
    publisher = naive_relay.make_publisher()
    path = publisher.topic_path(PROJECT, topic)
    try:
        futures = [
            publisher.publish(
                path, payload_bytes(i), ordering_key=key_of(i), outbox_event_id=str(ObjectId())
            )
            for i in range(count)
        ]
        for future in futures:
            future.result(timeout=300)
    finally:
        publisher.stop()


def _consume(bench: Bench, db: str, sub_path: str, count: int, inbox: bool) -> tuple[float, float]:
    """Seconds and process CPU seconds until ``count`` effects are in ``db``, consuming
    ``sub_path`` with an inbox or with a plain subscriber doing the same insert."""
    from google.cloud import pubsub_v1

    from mongo_outbox import Inbox

    client = bench.mongo_client
    effects = client[db].effects
    flow = pubsub_v1.types.FlowControl(max_messages=100)
    stop = threading.Event()
    subscriber = pubsub_v1.SubscriberClient()
    cpu0, started = time.process_time(), time.perf_counter()
    if inbox:
        box = Inbox(client, database=db, consumer="bench")

        def handle(tx: Any, message: Any) -> None:
            effects.insert_one({"event": message.attributes["outbox_event_id"]}, session=tx.session)

        runner = threading.Thread(
            target=box.subscribe,
            args=(sub_path, handle),
            kwargs={"stop": stop, "flow_control": flow, "subscriber": subscriber},
        )
        runner.start()
    else:

        def callback(message: Any) -> None:
            effects.insert_one({"event": message.attributes["outbox_event_id"]})
            message.ack()

        future = subscriber.subscribe(sub_path, callback, flow_control=flow)
    try:
        wait_until(lambda: effects.estimated_document_count() >= count, timeout=600, interval=0.05)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
    finally:
        if inbox:
            stop.set()
            runner.join(60)
        else:
            future.cancel()
            with contextlib.suppress(Exception):
                future.result(timeout=30)
        subscriber.close()
    if effects.count_documents({}) != count:
        raise BenchError(f"consume: {effects.count_documents({})} effects, expected {count}")
    return elapsed, cpu


def consume(bench: Bench, cfg: Config, rnd: int) -> Metrics:
    """Messages/s through ``Inbox.subscribe`` with a one-insert handler, against a plain
    subscriber doing the same insert without the inbox: the cost of exactly-once."""
    count = max(1000, cfg.n // 4)
    metrics: Metrics = {}
    with bench.topic("consume") as (topic, sub):
        second = sub.path + "-2"
        assert bench.subscriber is not None
        assert bench.publisher_admin is not None
        bench.subscriber.create_subscription(
            request={
                "name": second,
                "topic": bench.publisher_admin.topic_path(PROJECT, topic),
                "enable_message_ordering": True,
            }
        )
        try:
            _publish_for_consumers(topic, count)
            paths = {"inbox": sub.path, "plain": second}
            # Alternate which goes first, so neither always meets a warmer server.
            for name in ("inbox", "plain") if rnd % 2 == 0 else ("plain", "inbox"):
                with bench.database(f"consume_{name}") as target:
                    elapsed, cpu = _consume(bench, target, paths[name], count, name == "inbox")
                metrics[f"consume_{name}"] = count / elapsed
                metrics[f"consume_cpu_{name}"] = cpu / count * US
        finally:
            with contextlib.suppress(Exception):
                bench.subscriber.delete_subscription(subscription=second)
    metrics["consume_ratio"] = metrics["consume_plain"] / metrics["consume_inbox"]
    return metrics


SCENARIOS: dict[str, Callable[[Bench, Config, int], Metrics]] = {
    "raw": raw,
    "broker": broker,
    "naive": naive,
    "drain": drain,
    "stream": stream,
    "latency": latency,
    "write": write,
    "memory": memory,
    "restart": restart,
    "group": group,
    "consume": consume,
    "formats": formats,
}
