"""mongo-outbox benchmark: relay throughput, latency, write overhead, memory and restart time.

Usage::

    .venv/bin/python benchmarks/run.py [--n 20000] [--rounds 3] [--quick]

Starts its own throwaway single-node replica set and Pub/Sub emulator (both real, on
127.0.0.1), runs every scenario ``--rounds`` times on fresh databases and topics, and prints
one table (median, min and max over rounds, then the ratios against their targets) to stdout.
Progress goes to stderr. Nothing here asserts on timings: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import naive_relay
from bench_env import (
    PROJECT,
    Bench,
    ignore_interrupts,
    install_interrupt_handlers,
    key_of,
    log,
    payload_bytes,
    write_backlog,
)
from bench_scenarios import SCENARIOS, Config

from mongo_outbox import PubSubPublisher, Relay, RelayConfig

# (metric, scenario, label, unit, decimals)
ROWS: list[tuple[str, str, str, str, int]] = [
    ("raw", "raw", "stock PublisherClient, 16 keys", "msg/s", 0),
    ("broker", "broker", "raw protobuf requests via GAPIC", "msg/s", 0),
    ("broker_cpu", "broker", "  client CPU per message", "µs", 1),
    ("drain_vs_broker", "broker", "  drain as a fraction of broker", "x", 2),
    ("naive", "naive", "hand-rolled polling relay", "ev/s", 0),
    ("drain", "drain", "Relay.run_once on N pending", "ev/s", 0),
    ("drain_busy", "drain", "  start -> last published_at", "ev/s", 0),
    ("drain_tail", "drain", "  last published_at -> return", "s", 2),
    ("drain_cpu", "drain", "  relay CPU per event", "µs", 1),
    ("drain_cpu_share", "drain", "  relay CPU / wall time (cores)", "x", 2),
    ("stream", "stream", "relay tailing 100-ev/tx commits", "ev/s", 0),
    ("stream_writer", "stream", "  writer alone (commit rate)", "ev/s", 0),
    ("stream_cpu", "stream", "  relay CPU per event", "µs", 1),
    ("stream_cpu_share", "stream", "  relay CPU / wall time (cores)", "x", 2),
    ("latency_p50", "latency", "created -> published p50", "ms", 1),
    ("latency_p99", "latency", "created -> published p99", "ms", 1),
    ("latency_max", "latency", "  max", "ms", 1),
    ("latency_rate", "latency", "  achieved write rate", "ev/s", 0),
    ("write_outbox", "write", "outbox_transaction + 1 insert", "tx/s", 0),
    ("write_one", "write", "plain tx, 1 insert", "tx/s", 0),
    ("write_two", "write", "plain tx, 2 inserts (floor)", "tx/s", 0),
    ("write_ratio", "write", "outbox / floor, time per tx", "x", 3),
    ("memory_peak", "memory", "peak RSS, relay --once", "MB", 1),
    ("memory_rate", "memory", "  drain rate incl. start-up", "ev/s", 0),
    ("restart_first", "restart", "launch -> first published", "s", 3),
    ("restart_lease", "restart", "launch -> 'acquired the lease'", "s", 3),
    ("group_p1", "group", "1 relay, no partitions (today)", "ev/s", 0),
    ("group_1", "group", "1 relay, --partitions {P}", "ev/s", 0),
    ("group_2", "group", "2 relays, --partitions {P}", "ev/s", 0),
    ("group_4", "group", "4 relays, --partitions {P}", "ev/s", 0),
    ("group_ratio", "group", "  group of 1 vs today's relay", "x", 2),
    ("group_busy_p1", "group", "  today, first publish -> done", "ev/s", 0),
    ("group_busy_4", "group", "  4 relays, first publish -> done", "ev/s", 0),
    ("group_first_p1", "group", "  today, launch -> first publish", "s", 2),
    ("group_first_4", "group", "  4 relays, launch -> 1st publish", "s", 2),
    ("group_cpu_p1", "group", "  today, CPU per event", "µs", 1),
    ("group_cpu_1", "group", "  1 relay, CPU per event", "µs", 1),
    ("group_cpu_4", "group", "  4 relays, CPU per event (sum)", "µs", 1),
    ("consume_inbox", "consume", "Inbox.subscribe, 1-insert handler", "msg/s", 0),
    ("consume_plain", "consume", "plain subscriber, same insert", "msg/s", 0),
    ("consume_ratio", "consume", "  inbox / plain, time per message", "x", 2),
    ("consume_cpu_inbox", "consume", "  inbox, CPU per message", "µs", 1),
    ("consume_cpu_plain", "consume", "  plain, CPU per message", "µs", 1),
    ("formats_outbox", "formats", "run_once, outbox format", "ev/s", 0),
    ("formats_cloudevents", "formats", "run_once, CloudEvents format", "ev/s", 0),
    ("formats_cpu_outbox", "formats", "  CPU per event, outbox", "µs", 1),
    ("formats_cpu_cloudevents", "formats", "  CPU per event, CloudEvents", "µs", 1),
    ("formats_ratio", "formats", "  CloudEvents / outbox, CPU", "x", 2),
]


@dataclass(frozen=True)
class Target:
    label: str
    unit: str
    op: str  # ">=" or "<="
    goal: float
    decimals: int


TARGETS: list[Target] = [
    Target("drain / raw", "x", ">=", 1.0, 2),
    Target("stream / raw", "x", ">=", 1.0, 2),
    Target("drain / naive", "x", ">=", 2.0, 2),
    Target("latency p50", "ms", "<=", 10.0, 1),
    Target("latency p99", "ms", "<=", 30.0, 1),
    Target("write / floor (time)", "x", "<=", 1.10, 3),
    Target("peak RSS", "MB", "<=", 200.0, 1),
    Target("restart to first publish", "s", "<=", 1.0, 3),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, help="events per throughput round (default 20000)")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: N=2000, 1 round, small sizes")
    p.add_argument("--memory-n", type=int, help="backlog of the memory scenario (default 200000)")
    p.add_argument("--restart-n", type=int, help="backlog of the restart scenario (default 100000)")
    p.add_argument("--latency-seconds", type=float, help="writing time of the latency scenario")
    p.add_argument("--latency-rate", type=float, default=500.0, help="events/s (default 500)")
    p.add_argument(
        "--latency-relay",
        choices=["thread", "process"],
        default="thread",
        help="latency scenario: Relay.run in a thread of this process (default, as in stream) "
        "or `mongo-outbox relay` as its own process",
    )
    p.add_argument(
        "--stream-relay",
        choices=["thread", "process"],
        default="process",
        help="stream scenario: `mongo-outbox relay` as its own process (default, as deployed) "
        "or Relay.run in a thread of this process (it then shares the GIL with the writers)",
    )
    p.add_argument(
        "--stream-writers",
        type=int,
        default=2,
        help="stream scenario: writer threads, each owning a share of the keys (default 2)",
    )
    p.add_argument("--write-tx", type=int, help="transactions per variant (default 2000)")
    p.add_argument(
        "--drain-relay",
        choices=["thread", "process"],
        default="thread",
        help="drain scenario: Relay.run_once in this process (default; CPU is the process's "
        "while it runs) or `mongo-outbox relay --once` as its own process (timed and its CPU "
        "measured from 'acquired the lease' to its exit)",
    )
    p.add_argument(
        "--group-n", type=int, help="backlog of each group scenario run (default 100000)"
    )
    p.add_argument(
        "--group-partitions",
        type=int,
        default=4,
        help="group scenario: --partitions of the relays (default 4)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip pulling round 1's messages to verify them"
    )
    args = p.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def make_config(args: argparse.Namespace) -> Config:
    quick = bool(args.quick)

    def pick(value: float | None, full: float, smoke: float) -> float:
        return value if value is not None else (smoke if quick else full)

    cfg = Config(
        n=int(pick(args.n, 20_000, 2_000)),
        rounds=int(pick(args.rounds, 3, 1)),
        memory_n=int(pick(args.memory_n, 200_000, 20_000)),
        restart_n=int(pick(args.restart_n, 100_000, 10_000)),
        latency_seconds=float(pick(args.latency_seconds, 10.0, 2.0)),
        latency_rate=float(args.latency_rate),
        latency_relay=str(args.latency_relay),
        stream_relay=str(args.stream_relay),
        stream_writers=max(1, int(args.stream_writers)),
        drain_relay=str(args.drain_relay),
        group_n=int(pick(args.group_n, 100_000, 10_000)),
        group_partitions=max(1, int(args.group_partitions)),
        write_tx=int(pick(args.write_tx, 2_000, 200)),
        write_block=100 if not quick else 50,
        verify=not args.no_verify,
    )
    if cfg.n < 1 or cfg.rounds < 1:
        raise SystemExit("--n and --rounds must be positive")
    return cfg


def warm_up(bench: Bench) -> None:
    """Untimed: let the emulator's JVM, mongod and the drivers warm up before measuring."""
    log("warming up the emulator, mongod and the relay (not measured) ...")
    with bench.topic("warmup") as (topic, _sub):
        publisher = naive_relay.make_publisher()
        path = publisher.topic_path(PROJECT, topic)
        try:
            for _ in range(4):
                futures = [
                    publisher.publish(path, payload_bytes(i), ordering_key=key_of(i))
                    for i in range(10_000)
                ]
                for future in futures:
                    future.result(timeout=120)
        finally:
            publisher.stop()
        with bench.database("warmup") as db:
            write_backlog(bench.mongo_client, db, 10_000)
            relay_publisher = PubSubPublisher(PROJECT)
            try:
                relay = Relay(
                    bench.mongo_client,
                    relay_publisher,
                    RelayConfig(database=db, default_topic=topic),
                )
                relay.run_once()
            finally:
                relay_publisher.close()


def run_rounds(bench: Bench, cfg: Config, names: list[str]) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for rnd in range(cfg.rounds):
        this_round: dict[str, float] = {}
        for name in names:
            log(f"round {rnd + 1}/{cfg.rounds}: {name} ...")
            started = time.monotonic()
            try:
                metrics = SCENARIOS[name](bench, cfg, rnd)
            except Exception as exc:
                log(f"round {rnd + 1}: {name} FAILED: {exc!r}")
                traceback.print_exc(file=sys.stderr)
                bench.notes.append(f"{name} round {rnd + 1} failed: {exc!r}"[:300])
                continue
            shown = ", ".join(f"{k}={v:,.3g}" for k, v in metrics.items())
            log(f"  {name}: {shown} ({time.monotonic() - started:.1f} s)")
            for key, value in metrics.items():
                results.setdefault(key, []).append(value)
            this_round.update(metrics)
        # Ratios of two scenarios are taken within a round (same machine state), then medianed.
        if "drain" in this_round and this_round.get("broker"):
            ratio = this_round["drain"] / this_round["broker"]
            results.setdefault("drain_vs_broker", []).append(ratio)
    return results


def _fmt(value: float | None, decimals: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{decimals}f}"


def _median(results: dict[str, list[float]], key: str) -> float | None:
    values = results.get(key)
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def render(
    bench: Bench,
    cfg: Config,
    names: list[str],
    results: dict[str, list[float]],
    machine: list[tuple[str, str]],
    wall: float,
) -> str:
    out: list[str] = []
    out.append(
        f"mongo-outbox benchmark: N={cfg.n:,} rounds={cfg.rounds} memory-n={cfg.memory_n:,} "
        f"restart-n={cfg.restart_n:,} latency={cfg.latency_rate:g} ev/s for "
        f"{cfg.latency_seconds:g} s (relay in a {cfg.latency_relay}), stream: relay in a "
        f"{cfg.stream_relay}, {cfg.stream_writers} writer(s), drain: relay in a "
        f"{cfg.drain_relay}, group-n={cfg.group_n:,}, "
        f"write={cfg.write_tx:,} tx/variant; wall {wall:.0f} s"
    )
    out.append("machine: " + " | ".join(f"{k} {v}" for k, v in machine))
    out.append("")
    header = f"{'scenario':<9} {'metric':<32} {'unit':<6} {'median':>11} {'min':>11} {'max':>11}"
    rule = "-" * len(header)
    out += [header, rule]
    previous = None
    for key, scenario, label, unit, decimals in ROWS:
        if scenario not in names:
            continue
        values = results.get(key, [])
        if not values and scenario == "group" and key != "group_p1":
            continue  # the partitioned runs need `relay --partitions` (see the notes)
        label = label.replace("{P}", str(cfg.group_partitions))
        name = scenario if scenario != previous else ""
        previous = scenario
        med = statistics.median(values) if values else None
        lo = min(values) if values else None
        hi = max(values) if values else None
        runs = "" if len(values) == cfg.rounds else f"  ({len(values)}/{cfg.rounds} rounds)"
        out.append(
            f"{name:<9} {label:<32} {unit:<6} {_fmt(med, decimals):>11} "
            f"{_fmt(lo, decimals):>11} {_fmt(hi, decimals):>11}{runs}"
        )
    out.append(rule)
    values = {
        "drain / raw": _ratio(_median(results, "drain"), _median(results, "raw")),
        "stream / raw": _ratio(_median(results, "stream"), _median(results, "raw")),
        "drain / naive": _ratio(_median(results, "drain"), _median(results, "naive")),
        "latency p50": _median(results, "latency_p50"),
        "latency p99": _median(results, "latency_p99"),
        "write / floor (time)": _median(results, "write_ratio"),
        "peak RSS": _median(results, "memory_peak"),
        "restart to first publish": _median(results, "restart_first"),
    }
    out.append(f"{'ratio / target':<42} {'unit':<6} {'value':>11} {'target':>11} {'met':>11}")
    out.append(rule)
    for t in TARGETS:
        value = values[t.label]
        if value is None:
            met = "n/a"
        else:
            ok = value >= t.goal if t.op == ">=" else value <= t.goal
            met = "yes" if ok else "NO"
        goal = f"{t.op} {t.goal:g}"
        out.append(f"{t.label:<42} {t.unit:<6} {_fmt(value, t.decimals):>11} {goal:>11} {met:>11}")
    out.append(rule)
    notes = [
        "medians over rounds; ratios are of medians (write/floor: median of per-round ratios)",
        "raw = ceiling: 200-byte messages, no attributes; relay and naive messages also carry "
        "the 3 outbox_* attributes",
        "write floor: plain majority tx, 2 insert_one, 2nd into a collection with the outbox's "
        "(status, _id) index",
        "relay CPU = user+system: drain in a thread: this process's while run_once runs; as a "
        "process (and stream as a process): the relay process's; stream in a thread: this "
        "process's less the writer threads' and the main thread's",
        "latency = published_at - created_at (both ms-truncated; created_at is set at emit, "
        "before commit)",
        *bench.notes,
    ]
    achieved = _median(results, "latency_rate")
    if achieved is not None and achieved < 0.95 * cfg.latency_rate:
        notes.append(
            f"latency: the single writer reached only {achieved:,.0f} of the requested "
            f"{cfg.latency_rate:g} ev/s (one majority-committed transaction per event); "
            "when behind schedule it writes back to back"
        )
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    names = [n for n in SCENARIOS if n in args.scenarios.split(",")]
    install_interrupt_handlers()
    started = time.monotonic()
    bench = Bench(quick=bool(args.quick))
    try:
        bench.start()
        machine = bench.machine()
        warm_up(bench)
        results = run_rounds(bench, cfg, names)
        wall = time.monotonic() - started
        print(render(bench, cfg, names, results, machine, wall), flush=True)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        ignore_interrupts()
        log("stopping the relay processes, the emulator and mongod ...")
        bench.close()
        log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
