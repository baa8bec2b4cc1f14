"""What the ``mongo-outbox`` commands do, given their settings (``cli`` parses them)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType, SimpleNamespace
from typing import Any, Literal
from urllib.parse import urlsplit

from bson import ObjectId
from pymongo import MongoClient
from pymongo.errors import ConfigurationError as MongoConfigurationError
from pymongo.errors import ConnectionFailure, OperationFailure

from ._admin import GroupInfo, OutboxAdmin, RelayInfo, shared_outbox_warning
from ._errors import REPLICA_SET_FIX, ConfigurationError, ConnectError, LeaseLostError
from ._event import age_of, format_timestamp
from ._oplog import headroom, read_oplog_window, token_time
from ._retention import parse_duration, retention_of
from ._store import OutboxStore, ensure_indexes

Args = SimpleNamespace  # a command's settings, one attribute per option

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_CONNECT = 3
EXIT_CHECK = 4
_HEX_ID = re.compile(r"[0-9a-fA-F]{24}")
_INT_ID = re.compile(r"[-+]?[0-9]+")
_INT64 = range(-(2**63), 2**63)

log = logging.getLogger("mongo_outbox.cli")


class CommandError(Exception):
    """A command's failure, with the exit code it means."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def redact_uri(uri: str) -> str:
    """The URI without its user info, safe to print or log."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else "<URI>"


def _scrub(text: str, uri: str) -> str:
    try:
        parts = urlsplit(uri)
        secrets = [parts.password] if parts.password else []
    except ValueError:
        secrets = []
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def connect(args: Args) -> MongoClient[Any]:
    """A client of a reachable replica set; raises ConfigurationError or ConnectError."""
    if not args.mongo_uri:
        raise ConfigurationError("no MongoDB URI: pass --mongo-uri or set MONGO_OUTBOX_MONGO_URI")
    if not args.database:
        raise ConfigurationError("no database: pass --database or set MONGO_OUTBOX_DATABASE")
    uri = args.mongo_uri
    safe = redact_uri(uri)
    try:
        client: MongoClient[Any] = MongoClient(
            uri,
            serverSelectionTimeoutMS=int(args.connect_timeout * 1000),
            appname="mongo-outbox",
            # A half-open connection must not hang the relay (getMores wait 1 s at most).
            socketTimeoutMS=60_000,
            tz_aware=True,
        )
    except (MongoConfigurationError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"invalid MongoDB URI {safe}: {_scrub(str(exc), uri)}") from exc
    try:
        hello = client.admin.command("hello")
    except ConnectionFailure as exc:
        client.close()
        first = _scrub(str(exc), uri).split(" (configured timeouts")[0][:300]
        raise ConnectError(f"cannot connect to MongoDB at {safe}: {first}") from exc
    except OperationFailure as exc:
        client.close()
        raise ConfigurationError(f"MongoDB at {safe} refused us: {_scrub(str(exc), uri)}") from exc
    if "setName" not in hello and hello.get("msg") != "isdbgrid":
        client.close()
        raise ConfigurationError(f"MongoDB at {safe} is a standalone server; {REPLICA_SET_FIX}")
    return client


def init(args: Args) -> int:
    retention: float | Literal["off"] | None = None
    if args.retention is not None:
        try:
            retention = "off" if args.retention.strip() == "off" else parse_duration(args.retention)
        except ValueError as exc:
            raise CommandError(EXIT_CONFIG, f"--retention: {exc}") from exc
    client = connect(args)
    try:
        ensure_indexes(
            client,
            args.database,
            args.collection,
            partitions=args.partitions,
            retention=retention,
            inbox=args.inbox_collection,
        )
    finally:
        client.close()
    print(f"outbox {args.database}.{args.collection} ready (collections and indexes)")
    if retention is not None:
        print(
            "retention off"
            if retention == "off"
            else f"retention {_duration(retention)}: "
            "published events (and inbox records) older than that are deleted by MongoDB"
        )
    return EXIT_OK


def _duration(seconds: float | None) -> str:
    """``7d``, ``36h``, ``90m`` or ``45s``: the largest unit that divides ``seconds``."""
    if seconds is None:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def status(args: Args) -> int:
    client = connect(args)
    try:
        admin = _existing_outbox(client, args)
        counts = admin.counts()
        oldest = admin.oldest_pending()
        state = OutboxStore(client[args.database], args.collection).load_state(args.name)
        errors = admin.newest_errors()
        failing, reasons = admin.failing_pending()
        relays = admin.active_relays()
        group = admin.group(args.name)
        window = read_oplog_window(client)
        db = client[args.database]
        retention = {"outbox": retention_of(admin.outbox, "published_at")}
        if db.list_collection_names(filter={"name": "inbox"}):
            retention["inbox"] = retention_of(db["inbox"], "processed_at")
    finally:
        client.close()
    room = headroom(state.get("resume_token"), window)
    live = [r for r in relays if r.live]
    warnings = [shared_outbox_warning([r.name for r in live], admin.name)] if len(live) > 1 else []
    report: dict[str, Any] = {
        "outbox": f"{args.database}.{args.collection}",
        **counts,
        "oldest_pending_age_s": age_of(oldest.get("created_at")) if oldest else None,
        "relay": args.name,
        "has_checkpoint": state.get("resume_token") is not None,
        "checkpoint_age_s": age_of(state.get("checkpoint_at")),
        "checkpoint_at": _iso(state.get("checkpoint_at")),
        "lease_owner": state.get("lease_owner"),
        "lease_expires_at": _iso(state.get("lease_expires_at")),
        "failing": failing,
        "failing_reasons": [
            {
                "error": r.error,
                "events": r.events,
                "max_attempts": r.max_attempts,
                "next_attempt_at": _iso(r.next_attempt_at),
            }
            for r in reasons
        ],
        "newest_dead": [
            {
                "id": str(e["_id"]),
                "type": e.get("type"),
                "key": e.get("key"),
                "attempts": e.get("attempts"),
                "error": e.get("last_error"),
            }
            for e in errors
        ],
        "oplog_window_s": window.seconds,
        "oplog_headroom_s": room,
        "oplog_unavailable": window.unavailable,
        "relays": [_relay_report(r) for r in relays],
        "live_relays": [r.name for r in live],
        "group": None if group is None else _group_report(group),
        "retention_s": retention,
        "warnings": warnings,
    }
    check = args.check or args.max_lag is not None
    problems = _check_problems(report, args.max_lag) if check else []
    if check:
        report["check"] = {"ok": not problems, "failures": problems}
    code = EXIT_CHECK if problems else EXIT_OK
    if args.json:
        print(json.dumps(report, indent=2))
        return code

    def fmt_age(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}s"

    print(f"outbox            {report['outbox']}")
    print(f"pending           {counts['pending']}")
    print(f"published         {counts['published']}")
    print(f"dead              {counts['dead']}")
    print(f"failing           {failing}")
    for r in reasons:
        events = f"{r.events} event{'s' if r.events != 1 else ''}"
        print(f"  {events}, up to {r.max_attempts} attempts: {r.error}")
    print(f"oldest pending    {fmt_age(report['oldest_pending_age_s'])}")
    checkpoint = fmt_age(report["checkpoint_age_s"]) if report["has_checkpoint"] else "none"
    print(f"checkpoint ({args.name})  {checkpoint}")
    if window.unavailable is not None:
        print(f"oplog             unknown: {window.unavailable}")
    else:
        low = room is not None and window.seconds and room < window.seconds / 4
        print(
            f"oplog window      {fmt_age(window.seconds)}, checkpoint headroom {fmt_age(room)}"
            + ("  (low: under a quarter of the window)" if low else "")
        )
    print(
        "retention         "
        + ", ".join(f"{name} {_duration(value)}" for name, value in retention.items())
    )
    print(f"lease owner       {report['lease_owner'] or '-'}")
    holders = ", ".join(
        f"{r.name} (relay group)"
        if r.owner is None
        else f"{r.name} ({r.owner}, {r.lease_remaining or 0:.1f}s left)"
        for r in live
    )
    print(f"live relays       {holders or '-'}")
    if group is not None:
        _print_group(report["group"])
    for warning in warnings:
        print(f"warning: {warning}")
    for e in report["newest_dead"]:
        print(f"dead {e['id']} {e['type']} key={e['key']}: {e['error']}")
    if check:
        for problem in problems:
            print(f"check failed: {problem}")
        if not problems:
            print("check ok")
    return code


def _iso(value: Any) -> str | None:
    """ISO 8601 in UTC (as the message attributes), or None when ``value`` is no datetime."""
    return format_timestamp(value) if isinstance(value, _dt.datetime) else None


def _check_problems(report: dict[str, Any], max_lag: float | None) -> list[str]:
    """Why ``status --check`` fails: dead events, or a pending event older than ``max_lag``."""
    problems = []
    dead = report["dead"]
    if dead:
        problems.append(
            f"{dead} dead event{'s' if dead != 1 else ''}: list them with `mongo-outbox dead`, "
            "requeue them with `mongo-outbox requeue` once the cause is fixed"
        )
    age = report["oldest_pending_age_s"]
    if max_lag is not None and age is not None and age > max_lag:
        problems.append(f"the oldest pending event is {age:.0f}s old (limit {max_lag:g}s)")
    return problems


def _existing_outbox(client: MongoClient[Any], args: Args) -> OutboxAdmin:
    """The admin of the outbox collection, which must exist: a typo creates nothing."""
    admin = OutboxAdmin(client[args.database], args.collection)
    if not admin.exists():
        raise ConfigurationError(
            f"no outbox collection {admin.name}: check --database/--collection, "
            "or run `mongo-outbox init`"
        )
    return admin


def _relay_report(relay: RelayInfo) -> dict[str, Any]:
    expires = relay.lease_expires_at
    return {
        "name": relay.name,
        "owner": relay.owner,
        "live": relay.live,
        "lease_expires_at": _iso(expires),
        "lease_remaining_s": relay.lease_remaining,
        "checkpoint_age_s": age_of(relay.checkpoint_at),
    }


def _group_report(group: GroupInfo) -> dict[str, Any]:
    return {
        "name": group.name,
        "partitions": group.partitions,
        "members": [{"owner": m.owner, "live": m.live, "owns": m.owns} for m in group.members],
        "parts": [
            {
                "partition": p.index,
                "owner": p.owner,
                "lease_remaining_s": p.lease_remaining,
                "checkpoint_age_s": age_of(p.checkpoint_at),
                "pending": p.pending,
            }
            for p in group.parts
        ],
    }


def _print_group(group: dict[str, Any]) -> None:
    live = [m for m in group["members"] if m["live"]]
    print(f"group {group['name']}: {group['partitions']} partitions, {len(live)} live members")
    for m in live:
        owns = ", ".join(str(p) for p in m["owns"]) or "none"
        print(f"  member {m['owner']}  partitions {owns}")
    for p in group["parts"]:
        age = p["checkpoint_age_s"]
        print(
            f"  partition {p['partition']:<3} owner {p['owner'] or '-'}  checkpoint "
            f"{'none' if age is None else f'{age:.1f}s'}  pending {p['pending']}"
        )


def checkpoint(args: Args) -> int:
    if args.action == "show":
        return _checkpoint_show(args)
    client = connect(args)
    try:
        reset = OutboxAdmin(client[args.database], args.collection).reset_token(args.name)
    finally:
        client.close()
    print(f"checkpoint of relay {args.name!r} " + ("reset" if reset else "was not set"))
    return EXIT_OK


def _checkpoint_show(args: Args) -> int:
    client = connect(args)
    try:
        admin = _existing_outbox(client, args)
        state = OutboxStore(admin.db, args.collection).load_state(args.name)
    finally:
        client.close()
    token = state.get("resume_token")
    token = token if isinstance(token, dict) else None
    at = token_time(token)
    token_at = _dt.datetime.fromtimestamp(at.time, _dt.timezone.utc) if at else None
    report = {
        "outbox": admin.name,
        "relay": args.name,
        "has_checkpoint": token is not None,
        "checkpoint_at": _iso(state.get("checkpoint_at")),
        "checkpoint_age_s": age_of(state.get("checkpoint_at")),
        "token_time": _iso(token_at),
        "token_age_s": age_of(token_at),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    if token is None:
        print(f"relay {args.name!r} has no checkpoint: its next start sweeps every pending event")
        return EXIT_OK

    def when(iso: str | None, age: float | None) -> str:
        return "-" if iso is None else f"{iso} ({age or 0:.1f}s ago)"

    print(f"relay             {args.name}")
    print(f"checkpoint at     {when(report['checkpoint_at'], report['checkpoint_age_s'])}")
    print(f"token time        {when(report['token_time'], report['token_age_s'])}")
    return EXIT_OK


def dead(args: Args) -> int:
    ids = None if args.id is None else [v for i in args.id for v in _id_values(i)]
    client = connect(args)
    try:
        admin = _existing_outbox(client, args)
        total, events = admin.dead_events(
            ids=ids,
            event_type=args.type,
            key=args.key,
            older_than=_older_than(args.older_than),
            limit=args.limit,
        )
    finally:
        client.close()
    listed = [
        {
            "id": str(e["_id"]),
            "type": e.get("type"),
            "topic": e.get("topic"),
            "key": e.get("key"),
            "attempts": e.get("attempts"),
            "created_at": _iso(e.get("created_at")),
            "error": e.get("last_error"),
        }
        for e in events
    ]
    if args.json:
        print(json.dumps({"outbox": admin.name, "total": total, "events": listed}, indent=2))
        return EXIT_OK
    if not listed:
        print("no dead events")
        return EXIT_OK
    for e in listed:
        print(
            f"{e['id']} {e['type']} topic={e['topic']} key={e['key']} attempts={e['attempts']} "
            f"created={e['created_at']}: {e['error']}"
        )
    if total > len(listed):
        print(f"showing {len(listed)} of {total} (--limit)")
    return EXIT_OK


def _older_than(seconds: float | None) -> _dt.datetime | None:
    if seconds is None:
        return None
    return _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=seconds)


def requeue(args: Args) -> int:
    filters = (args.id, args.type, args.key, args.older_than)
    if not args.all and all(f is None for f in filters):
        raise CommandError(
            EXIT_CONFIG,
            "say which dead events to requeue: --id, --type, --key, --older-than, or --all",
        )
    ids = None if args.id is None else [v for i in args.id for v in _id_values(i)]
    older = _older_than(args.older_than)
    client = connect(args)
    try:
        admin = _existing_outbox(client, args)
        count = admin.requeue(ids=ids, event_type=args.type, key=args.key, older_than=older)
    finally:
        client.close()
    print(f"requeued {count} dead event{'s' if count != 1 else ''}")
    return EXIT_OK


def _id_values(text: str) -> list[Any]:
    """Every ``_id`` an operator may mean by ``text``: the string, an ObjectId, an integer."""
    values: list[Any] = [text]
    if _HEX_ID.fullmatch(text):
        values.append(ObjectId(text))
    if _INT_ID.fullmatch(text) and len(text) <= 20 and int(text) in _INT64:
        values.append(int(text))
    return values


def relay(args: Args) -> int:
    from .publishers import PubSubPublisher
    from .relay import Relay, RelayConfig

    if not args.project:
        raise CommandError(
            EXIT_CONFIG, "no Google Cloud project: pass --project or set MONGO_OUTBOX_PROJECT"
        )
    try:
        config = RelayConfig(
            database=args.database or "-",
            collection=args.collection,
            name=args.name,
            default_topic=args.default_topic,
            batch_size=args.batch_size,
            max_batch_bytes=args.max_batch_bytes,
            queue_bytes=2 * args.max_batch_bytes,
            isolate_after=args.isolate_after,
            unhealthy_after=args.unhealthy_after,
            max_attempts=args.max_attempts,
            lease_ttl=args.lease_ttl,
            dead_key_policy=args.dead_key_policy,
            partitions=args.partitions,
            message_format=args.message_format,
            cloudevents_source=args.cloudevents_source,
        )
        if args.default_topic is not None:
            from ._event import check_topic

            check_topic(args.default_topic)
    except ValueError as exc:
        raise CommandError(EXIT_CONFIG, f"bad relay setting: {exc}") from exc
    client = connect(args)
    publisher = PubSubPublisher(args.project, create_topics=args.create_topics)
    relay = Relay(client, publisher, config)
    server = None
    try:
        if args.http_port is not None:
            from .relay._http import RelayHTTPServer

            try:
                server = RelayHTTPServer(relay, args.http_host, args.http_port)
            except OSError as exc:
                raise CommandError(
                    EXIT_CONFIG, f"cannot serve HTTP on {args.http_host}:{args.http_port}: {exc}"
                ) from exc
        if args.once:
            gc.freeze()
            try:
                count = relay.run_once()
            except LeaseLostError as exc:
                log.warning("%s; nothing to do", exc)
                return EXIT_OK
            log.info("published %d events", count)
            return EXIT_OK
        # Everything made so far lives as long as the process: keep the collector off it
        # (its passes over these objects cost about 2 us per event).
        gc.freeze()
        stop = threading.Event()
        log.info(
            "relaying %s.%s to project %s as %r",
            args.database,
            args.collection,
            args.project,
            args.name,
        )
        with _stopped_by_signals(stop):
            relay.run(stop)
        log.info("stopped after publishing %d events", relay.stats.published)
        return EXIT_OK
    finally:
        if server is not None:
            server.close()
        publisher.close()
        client.close()


def replay(args: Args) -> int:
    from ._formats import message_format
    from ._replay import Replay, ReplaySelection, parse_time
    from .publishers import PubSubPublisher

    try:
        selection = ReplaySelection(
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
            types=[args.type] if args.type else (),
            keys=[args.key] if args.key else (),
            ids=[v for i in args.id or () for v in _id_values(i)],
        )
        fmt = message_format(
            args.message_format, args.cloudevents_source, args.database or "-", args.collection
        )
    except ValueError as exc:
        raise CommandError(EXIT_CONFIG, f"bad replay setting: {exc}") from exc
    if not args.project and not args.dry_run:
        raise CommandError(
            EXIT_CONFIG, "no Google Cloud project: pass --project or set MONGO_OUTBOX_PROJECT"
        )
    client = connect(args)
    publisher = PubSubPublisher(args.project or "-")
    progress = _Progress() if sys.stderr.isatty() else None
    try:
        collection = _existing_outbox(client, args).outbox
        run = Replay(
            collection,
            publisher,
            selection,
            fmt=fmt,
            to_topic=args.to_topic,
            default_topic=args.default_topic,
            rate=args.rate,
            on_progress=progress,
        )
        counts = run.count_by_topic()
        if args.dry_run:
            total = sum(counts.values())
            per_topic = ", ".join(f"{t or '(no topic)'} {n}" for t, n in sorted(counts.items()))
            print(
                f"would replay {total} event{'s' if total != 1 else ''}"
                + (f": {per_topic}" if per_topic else "")
            )
            return EXIT_OK
        stop = threading.Event()
        started = time.monotonic()
        with _stopped_by_signals(stop):
            result = run.run(stop)
    finally:
        publisher.close()
        client.close()
    if progress is not None:
        progress.end()
    rate = result.published / max(time.monotonic() - started, 1e-9)
    print(
        f"replayed {result.published} event{'s' if result.published != 1 else ''} ({rate:,.0f}/s)"
    )
    for reason in result.skipped_reasons:
        log.warning("skipped %s", reason)
    if result.skipped:
        print(f"skipped {result.skipped} that cannot be published (reasons in the log)")
    if result.error is not None or result.interrupted:
        last = f"; the last replayed event is {result.last_id}" if result.last_id else ""
        why = f"publishing failed: {result.error}" if result.error else "interrupted"
        raise CommandError(EXIT_UNEXPECTED, f"replay stopped, {why}{last}")
    return EXIT_OK


class _Progress:
    """``replayed N of M`` on one terminal line, redrawn at most five times a second."""

    def __init__(self) -> None:
        self._started = self._shown = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._shown >= 0.2 or done == total:
            self._shown = now
            rate = done / max(now - self._started, 1e-9)
            sys.stderr.write(f"\rreplayed {done:,} of {total:,} events ({rate:,.0f}/s) ")
            sys.stderr.flush()

    def end(self) -> None:
        sys.stderr.write("\n")


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` (a second one exits at once) until the block ends."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            # Second signal: leave now; at-least-once delivery tolerates the lost batch.
            os._exit(EXIT_UNEXPECTED)
        log.info("%s received: finishing the batch, then exiting", signal.Signals(signum).name)
        # Not stop.set() here: the main thread may hold the event's lock at this very moment.
        threading.Thread(target=stop.set, name="outbox-stop").start()

    previous = [(s, signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)]
    for signum, _ in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous:
            signal.signal(signum, old)


def demo(args: Args) -> int:
    from ._demo import run_demo

    if args.log_level != "DEBUG":
        # The demo narrates; the relay's own INFO lines would only interleave with it.
        logging.getLogger("mongo_outbox").setLevel(logging.WARNING)
    return run_demo()
