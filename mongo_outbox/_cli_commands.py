"""What the ``mongo-outbox`` commands do, given their settings (``cli`` parses them).

A command's docstring is its ``--help`` text.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from types import SimpleNamespace
from typing import Any, Literal

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import MongoClient
from pymongo.errors import ConfigurationError as MongoConfigurationError

from ._admin import GroupInfo, OutboxAdmin, RelayInfo
from ._errors import ConfigurationError, LeaseLostError
from ._limits import check_topic
from ._malloc import fix_mmap_threshold
from ._mongo_errors import check_replica_set, require_outbox
from ._oplog import headroom, read_oplog_window, token_time
from ._redact import Redactor, redact_uri, unescaped_hint
from ._retention import parse_duration, retention_of
from ._signals import stop_on_signals
from ._store import OutboxStore, ensure_indexes
from ._times import age_of, format_timestamp
from .relay._lease import shared_outbox_warning

Args = SimpleNamespace  # a command's settings, one attribute per option

EXIT_OK, EXIT_UNEXPECTED, EXIT_CONFIG, EXIT_CONNECT, EXIT_CHECK = 0, 1, 2, 3, 4
NO_PROJECT = "no Google Cloud project: pass --project or set MONGO_OUTBOX_PROJECT"
_HEX_ID = re.compile(r"[0-9a-fA-F]{24}")
_INT_ID = re.compile(r"[-+]?[0-9]+")
_INT64 = range(-(2**63), 2**63)

log = logging.getLogger("mongo_outbox.cli")


class CommandError(Exception):
    """A command's failure, with the exit code it means."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def connect(args: Args) -> MongoClient[Any]:
    """A client of a reachable replica set; raises ConfigurationError or ConnectError."""
    if not args.mongo_uri:
        raise ConfigurationError("no MongoDB URI: pass --mongo-uri or set MONGO_OUTBOX_MONGO_URI")
    if not args.database:
        raise ConfigurationError("no database: pass --database or set MONGO_OUTBOX_DATABASE")
    uri, safe, scrub = args.mongo_uri, redact_uri(args.mongo_uri), Redactor.for_uris(args.mongo_uri)
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
        raise ConfigurationError(
            f"invalid MongoDB URI {safe}: {scrub(str(exc))}{unescaped_hint(uri)}"
        ) from exc
    try:
        check_replica_set(client, safe, scrub)
    except BaseException:
        client.close()
        raise
    return client


def _existing_outbox(client: MongoClient[Any], args: Args) -> OutboxAdmin:
    """The admin of the outbox collection, which must exist: a typo creates nothing."""
    admin = OutboxAdmin(client[args.database], args.collection)
    require_outbox(admin.outbox)
    return admin


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _iso(value: Any) -> str | None:
    """ISO 8601 in UTC (as the message attributes), or None when ``value`` is no datetime."""
    return format_timestamp(value) if isinstance(value, _dt.datetime) else None


def _age(seconds: float | None, none: str = "-") -> str:
    return none if seconds is None else f"{seconds:.1f}s"


def _duration(seconds: float | None) -> str:
    """``7d``, ``36h``, ``90m`` or ``45s``: the largest unit that divides ``seconds``."""
    if seconds is None:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def init(args: Args) -> int:
    """Create the outbox collection, its relay state collection and their indexes (idempotent).
    The application can do the same with ensure_indexes()."""
    retention: float | Literal["off"] | None = None
    if args.retention is not None:
        try:
            retention = "off" if args.retention.strip() == "off" else parse_duration(args.retention)
        except ValueError as exc:
            raise ConfigurationError(f"--retention: {exc}") from exc
    with connect(args) as client:
        ensure_indexes(
            client,
            args.database,
            args.collection,
            partitions=args.partitions,
            retention=retention,
            inbox=args.inbox_collection,
        )
    print(f"outbox {args.database}.{args.collection} ready (collections and indexes)")
    if retention == "off":
        print("retention off")
    elif retention is not None:
        print(
            f"retention {_duration(retention)}: "
            "published events (and inbox records) older than that are deleted by MongoDB"
        )
    return EXIT_OK


def status(args: Args) -> int:
    """Show the outbox: events per status, pending events that have failed and why, the newest
    dead events, the age of the oldest pending event, the checkpoint and the relays holding a
    lease. With --check, exit 4 when events are dead or the oldest pending event is older than
    --max-lag: for scripts and alerts. A missing outbox collection is an error (exit 2);
    nothing is created."""
    with connect(args) as client:
        admin = _existing_outbox(client, args)
        counts = admin.counts()
        oldest = admin.oldest_pending()
        state = OutboxStore(admin.db, args.collection).load_state(args.name)
        errors = admin.newest_errors()
        failing = admin.failing_pending()
        relays = admin.active_relays()
        group = admin.group(args.name)
        window = read_oplog_window(client)
        retention = {"outbox": retention_of(admin.outbox, "published_at")}
        inbox = args.inbox_collection
        if admin.db.list_collection_names(filter={"name": inbox}):
            retention[inbox] = retention_of(admin.db[inbox], "processed_at")
    room = headroom(state.get("resume_token"), window)
    live = [r for r in relays if r.live]
    warnings = [shared_outbox_warning([r.name for r in live], admin.name)] if len(live) > 1 else []
    report: dict[str, Any] = {
        "outbox": admin.name,
        **counts,
        "oldest_pending_age_s": age_of(oldest.get("created_at")) if oldest else None,
        "relay": args.name,
        "has_checkpoint": state.get("resume_token") is not None,
        "checkpoint_age_s": age_of(state.get("checkpoint_at")),
        "checkpoint_at": _iso(state.get("checkpoint_at")),
        "lease_owner": state.get("lease_owner"),
        "lease_expires_at": _iso(state.get("lease_expires_at")),
        "failing": failing.events,
        "failing_reasons": [
            asdict(r) | {"next_attempt_at": _iso(r.next_attempt_at)} for r in failing.reasons
        ],
        "failing_other_reasons": {
            "reasons": failing.other_reasons,
            "events": failing.other_events,
        },
        "newest_dead": [
            {k: v for k, v in _dead_event(e).items() if k not in ("topic", "created_at")}
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
    print(f"outbox            {report['outbox']}")
    for name in ("pending", "published", "dead", "failing"):
        print(f"{name:<18}{report[name]}")
    for r in failing.reasons:
        print(f"  {_plural(r.events, 'event')}, up to {r.max_attempts} attempts: {r.error}")
    if failing.other_reasons:
        more = _plural(failing.other_reasons, "more reason")
        print(f"  and {more} ({_plural(failing.other_events, 'event')})")
    print(f"oldest pending    {_age(report['oldest_pending_age_s'])}")
    checkpoint_age = _age(report["checkpoint_age_s"]) if report["has_checkpoint"] else "none"
    print(f"checkpoint ({args.name})  {checkpoint_age}")
    if window.unavailable is not None:
        print(f"oplog             unknown: {window.unavailable}")
    else:
        low = room is not None and window.seconds and room < window.seconds / 4
        note = "  (low: under a quarter of the window)" if low else ""
        print(f"oplog window      {_age(window.seconds)}, checkpoint headroom {_age(room)}{note}")
    print("retention         " + ", ".join(f"{n} {_duration(s)}" for n, s in retention.items()))
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
    for problem in problems:
        print(f"check failed: {problem}")
    if check and not problems:
        print("check ok")
    return code


def _check_problems(report: dict[str, Any], max_lag: float | None) -> list[str]:
    """Why ``status --check`` fails: dead events, or a pending event older than ``max_lag``."""
    problems = []
    if report["dead"]:
        problems.append(
            f"{_plural(report['dead'], 'dead event')}: list them with `mongo-outbox dead`, "
            "requeue them with `mongo-outbox requeue` once the cause is fixed"
        )
    age = report["oldest_pending_age_s"]
    if max_lag is not None and age is not None and age > max_lag:
        problems.append(f"the oldest pending event is {age:.0f}s old (limit {max_lag:g}s)")
    return problems


def _relay_report(relay: RelayInfo) -> dict[str, Any]:
    return {
        "name": relay.name,
        "owner": relay.owner,
        "live": relay.live,
        "lease_expires_at": _iso(relay.lease_expires_at),
        "lease_remaining_s": relay.lease_remaining,
        "checkpoint_age_s": age_of(relay.checkpoint_at),
    }


def _group_report(group: GroupInfo) -> dict[str, Any]:
    return {
        "name": group.name,
        "partitions": group.partitions,
        "members": [asdict(m) for m in group.members],
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
        print(
            f"  partition {p['partition']:<3} owner {p['owner'] or '-'}  checkpoint "
            f"{_age(p['checkpoint_age_s'], 'none')}  pending {p['pending']}"
        )


def checkpoint(args: Args) -> int:
    """show (default): when the relay last saved its change stream position and the cluster
    time that position points at. reset: forget it, so that the next start opens the stream
    now and sweeps every pending event (gap-free)."""
    with connect(args) as client:
        if args.action == "reset":
            reset = OutboxAdmin(client[args.database], args.collection).reset_token(args.name)
            print(f"checkpoint of relay {args.name!r} " + ("reset" if reset else "was not set"))
            return EXIT_OK
        admin = _existing_outbox(client, args)
        state = OutboxStore(admin.db, args.collection).load_state(args.name)
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

    def when(iso: str | None, age: float | None) -> str:
        return "-" if iso is None else f"{iso} ({age or 0:.1f}s ago)"

    if args.json:
        print(json.dumps(report, indent=2))
    elif token is None:
        print(f"relay {args.name!r} has no checkpoint: its next start sweeps every pending event")
    else:
        print(f"relay             {args.name}")
        print(f"checkpoint at     {when(report['checkpoint_at'], report['checkpoint_age_s'])}")
        print(f"token time        {when(report['token_time'], report['token_age_s'])}")
    return EXIT_OK


def dead(args: Args) -> int:
    """List dead events, newest first, with their reasons. Filter as requeue does (all filters
    must match); then requeue them with the same filters."""
    with connect(args) as client:
        admin = _existing_outbox(client, args)
        total, events = admin.dead_events(**_dead_filters(args), limit=args.limit)
    listed = [_dead_event(e) for e in events]
    if args.json:
        print(json.dumps({"outbox": admin.name, "total": total, "events": listed}, indent=2))
        return EXIT_OK
    if not listed:
        print("no dead events")
    for e in listed:
        print(
            f"{e['id']} {e['type']} topic={e['topic']} key={e['key']} attempts={e['attempts']} "
            f"created={e['created_at']}: {e['error']}"
        )
    if total > len(listed):
        print(f"showing {len(listed)} of {total} (--limit)")
    return EXIT_OK


def _dead_event(event: dict[str, Any]) -> dict[str, Any]:
    """A dead event as ``dead`` reports it (``status`` leaves out its topic and creation time)."""
    return {
        "id": str(event["_id"]),
        "type": event.get("type"),
        "topic": event.get("topic"),
        "key": event.get("key"),
        "attempts": event.get("attempts"),
        "created_at": _iso(event.get("created_at")),
        "error": event.get("last_error"),
    }


def requeue(args: Args) -> int:
    """Requeue dead events so the relay publishes them again (attempts restart from zero). Name
    events by --id, --type, --key, --older-than (all must match), or pass --all."""
    if not args.all and all(f is None for f in (args.id, args.type, args.key, args.older_than)):
        raise ConfigurationError(
            "say which dead events to requeue: --id, --type, --key, --older-than, or --all"
        )
    with connect(args) as client:
        count = _existing_outbox(client, args).requeue(**_dead_filters(args))
    print(f"requeued {_plural(count, 'dead event')}")
    return EXIT_OK


def _dead_filters(args: Args) -> dict[str, Any]:
    """The dead events --id, --type, --key and --older-than select, as OutboxAdmin takes them."""
    older = None
    if args.older_than is not None:
        older = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=args.older_than)
    return dict(ids=_ids(args), event_type=args.type, key=args.key, older_than=older)


def _ids(args: Args) -> list[Any] | None:
    """Every ``_id`` an operator may mean by the --id values: as written, as an ObjectId (24
    hex digits), as an integer; None without --id."""
    if args.id is None:
        return None
    values: list[Any] = []
    for text in args.id:
        values.append(text)
        if _HEX_ID.fullmatch(text):
            values.append(ObjectId(text))
        if _INT_ID.fullmatch(text) and len(text) <= 20 and int(text) in _INT64:
            values.append(int(text))
    return values


def relay(args: Args) -> int:
    """Tail the outbox change stream and publish each event to Pub/Sub at least once, in order
    per key. SIGTERM/SIGINT: finish the batch, checkpoint, exit 0; a second signal exits at
    once. PUBSUB_EMULATOR_HOST is honoured."""
    from .publishers import PubSubPublisher
    from .relay import Relay, RelayConfig

    if not args.project:
        raise ConfigurationError(NO_PROJECT)
    # Each relay option named after a RelayConfig field sets that field.
    given = {f.name: getattr(args, f.name) for f in fields(RelayConfig) if hasattr(args, f.name)}
    given.update(database=args.database or "-", queue_bytes=2 * args.max_batch_bytes)
    try:
        config = RelayConfig(**given)
        check_topic(args.default_topic)
    except ValueError as exc:
        raise ConfigurationError(f"bad relay setting: {exc}") from exc
    fix_mmap_threshold()  # memory bounded by the byte budgets, also with many threads
    with contextlib.ExitStack() as closing:  # closes the HTTP side, the publisher, the client
        stop = threading.Event() if args.once else closing.enter_context(stop_on_signals())
        client = closing.enter_context(connect(args))
        publisher = PubSubPublisher(args.project, create_topics=args.create_topics)
        closing.callback(publisher.close)
        relay = Relay(client, publisher, config)
        if args.http_port is not None:
            from .relay._http import RelayHTTPServer

            try:
                closing.callback(RelayHTTPServer(relay, args.http_host, args.http_port).close)
            except OSError as exc:
                where = f"{args.http_host}:{args.http_port}"
                raise ConfigurationError(f"cannot serve HTTP on {where}: {exc}") from exc
        # Everything made so far lives as long as the process: keep the collector off it
        # (its passes over these objects cost about 2 us per event).
        gc.freeze()
        if args.once:
            try:
                log.info("published %d events", relay.run_once())
            except LeaseLostError as exc:
                log.warning("%s; nothing to do", exc)
            return EXIT_OK
        log.info(
            "relaying %s.%s to project %s as %r",
            args.database,
            args.collection,
            args.project,
            args.name,
        )
        relay.run(stop)
        log.info("stopped after publishing %d events", relay.stats.published)
    return EXIT_OK


def replay(args: Args) -> int:
    """Publish published events again, to their topic or --to-topic, in _id order (so in order
    per key), with the attribute outbox_replay=1, for a consumer that lost its data. Select them
    by --since/--until (of created_at), --type, --key and --id (all given must match; at least
    one is required). Their outbox documents are only read. Ctrl-C stops after the batch in
    flight."""
    from ._formats import message_format
    from ._replay import Replay, ReplaySelection, parse_time
    from .publishers import PubSubPublisher

    try:
        selection = ReplaySelection(
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
            types=[args.type] if args.type else (),
            keys=[args.key] if args.key else (),
            ids=_ids(args) or (),
            after=ObjectId(args.after) if args.after else None,
        )
        fmt = message_format(
            args.message_format, args.cloudevents_source, args.database or "-", args.collection
        )
        check_topic(args.to_topic)
        check_topic(args.default_topic)
    except (ValueError, InvalidId) as exc:
        raise ConfigurationError(f"bad replay setting: {exc}") from exc
    if not args.project and not args.dry_run:
        raise ConfigurationError(NO_PROJECT)
    progress = _progress() if sys.stderr.isatty() else None
    with contextlib.ExitStack() as closing:
        client = closing.enter_context(connect(args))
        # A dry run only counts: no publisher, so no Google credentials needed.
        pub = None if args.dry_run else PubSubPublisher(args.project)
        if pub is not None:
            closing.callback(pub.close)
        run = Replay(
            _existing_outbox(client, args).outbox,
            pub,
            selection,
            fmt=fmt,
            to_topic=args.to_topic,
            default_topic=args.default_topic,
            rate=args.rate,
            on_progress=progress,
        )
        if args.dry_run:
            counts = run.count_by_topic()
            per_topic = ", ".join(f"{t or '(no topic)'} {n}" for t, n in sorted(counts.items()))
            total = _plural(sum(counts.values()), "event")
            print(f"would replay {total}" + (f": {per_topic}" if per_topic else ""))
            return EXIT_OK
        started = time.monotonic()
        stop = closing.enter_context(stop_on_signals())
        result = run.run(stop)
    if progress is not None:
        sys.stderr.write("\n")
    rate = result.published / max(time.monotonic() - started, 1e-9)
    print(f"replayed {_plural(result.published, 'event')} ({rate:,.0f}/s)")
    for reason in result.skipped_reasons:
        log.warning("skipped %s", reason)
    if result.failure is not None:
        raise CommandError(EXIT_UNEXPECTED, result.failure)
    return EXIT_OK


def _progress() -> Callable[[int, int], None]:
    """Draws ``replayed N of M events (rate)`` over itself on one terminal line, per batch."""
    started = time.monotonic()

    def show(done: int, total: int) -> None:
        rate = done / max(time.monotonic() - started, 1e-9)
        sys.stderr.write(f"\rreplayed {done:,} of {total:,} events ({rate:,.0f}/s) ")
        sys.stderr.flush()

    return show


def demo(args: Args) -> int:
    """Start a single-node replica set and the Pub/Sub emulator, write orders with events, relay
    them and show them arriving on a subscription; then stop everything."""
    from ._demo import run_demo

    if args.log_level != "DEBUG":
        # The demo narrates; the relay's own INFO lines would only interleave with it.
        logging.getLogger("mongo_outbox").setLevel(logging.WARNING)
    return run_demo()


def asyncapi(args: Args) -> int:
    """Write an AsyncAPI 3.0 document of the events declared with @event in MODULE (a module
    name, importable from the current directory): a channel per topic, a message per event type
    with its payload's JSON Schema and the attributes the relay adds in --message-format, and
    send operations. YAML, or JSON for a .json --output. Needs mongo-outbox[pydantic]."""
    try:
        from . import typed
    except ImportError as exc:
        raise CommandError(EXIT_CONFIG, str(exc)) from exc
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project's own modules
    try:
        module = importlib.import_module(args.module)
    except Exception as exc:  # whatever importing it raised: a missing module, a broken one
        raise CommandError(
            EXIT_CONFIG, f"cannot import module {args.module!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not typed.event_classes(module):
        raise CommandError(
            EXIT_CONFIG, f"module {args.module!r} declares no events (no @event class in it)"
        )
    document = typed.asyncapi(
        module,
        message_format=args.message_format,
        cloudevents_source=args.cloudevents_source,
        title=args.title,
        version=args.doc_version,
    )
    output = args.output
    text = typed.dump(document, json_output=bool(output) and output.endswith(".json"))
    if output:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
        log.info("wrote %s (%d events)", output, len(document["components"]["messages"]))
    else:
        sys.stdout.write(text)
    return EXIT_OK
