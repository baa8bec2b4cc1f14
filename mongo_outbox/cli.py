"""The ``mongo-outbox`` command: relay, init, status, dead, requeue, checkpoint, demo.

Every flag can also come from an environment variable ``MONGO_OUTBOX_<FLAG>`` (upper case,
dashes as underscores), e.g. ``MONGO_OUTBOX_MONGO_URI``. Exit codes: 0 ok, 1 killed or
unexpected error, 2 bad configuration (a missing outbox included), 3 cannot connect, 4
``status --check`` failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Literal, NoReturn
from urllib.parse import unquote, urlsplit

from bson import ObjectId
from google.auth.exceptions import DefaultCredentialsError
from pymongo import MongoClient
from pymongo.errors import ConfigurationError as MongoConfigurationError
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from . import __version__
from ._admin import GroupInfo, OutboxAdmin, RelayInfo, shared_outbox_warning
from ._errors import REPLICA_SET_FIX, ConfigurationError, ConnectError, LeaseLostError
from ._event import age_of, format_timestamp
from ._logging import LOG_FORMATS, cli_logging, redact
from ._oplog import headroom, read_oplog_window, token_time
from ._retention import parse_duration, retention_of
from ._store import OutboxStore, ensure_indexes

__all__ = ["main", "parse_args"]

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_CONNECT = 3
EXIT_CHECK = 4
ENV_PREFIX = "MONGO_OUTBOX_"
_HEX_ID = re.compile(r"[0-9a-fA-F]{24}")
_INT_ID = re.compile(r"[-+]?[0-9]+")
_INT64 = range(-(2**63), 2**63)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

log = logging.getLogger("mongo_outbox.cli")


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _env(flag: str) -> str | None:
    return os.environ.get(_env_name(flag))


def _env_bool(flag: str) -> bool:
    value = _env(flag)
    if value is None:
        return False
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise _Exit(
        EXIT_CONFIG,
        f"{_env_name(flag)}={value!r} is not a boolean: use 1/0, true/false, yes/no",
    )


def _number(kind: type[float] | type[int], flag: str) -> Callable[[str], float | int]:
    env = _env_name(flag)

    def convert(value: str) -> float | int:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a{'n integer' if kind is int else ' number'} "
                f"(from {flag} or {env})"
            ) from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be positive (from {flag} or {env})")
        return number

    return convert


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


def _add_mongo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mongo-uri",
        default=_env("--mongo-uri"),
        help="MongoDB connection string of a replica set (env MONGO_OUTBOX_MONGO_URI)",
    )
    p.add_argument(
        "--database",
        default=_env("--database"),
        help="database holding the outbox (env MONGO_OUTBOX_DATABASE)",
    )
    p.add_argument(
        "--collection",
        default=_env("--collection") or "outbox",
        help="outbox collection (default: outbox)",
    )
    p.add_argument(
        "--connect-timeout",
        type=_number(float, "--connect-timeout"),
        default=_env("--connect-timeout") or "10.0",
        help="seconds to wait for MongoDB before giving up with exit 3 (default 10)",
    )


def _add_log_flags(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--log-level`` and ``--log-format``; a subcommand's copy overrides the top one only
    when given (its default is SUPPRESS), so the flags work before or after the command."""
    p.add_argument(
        "--log-level",
        default=(_env("--log-level") or "INFO").upper() if top else argparse.SUPPRESS,
        choices=_LOG_LEVELS,
        type=str.upper,
        help="DEBUG, INFO (default), WARNING or ERROR (env MONGO_OUTBOX_LOG_LEVEL)",
    )
    p.add_argument(
        "--log-format",
        default=(_env("--log-format") or "text").lower() if top else argparse.SUPPRESS,
        choices=LOG_FORMATS,
        type=str.lower,
        help="text (default) or json: one JSON object per line (env MONGO_OUTBOX_LOG_FORMAT)",
    )


def _add_dead_filters(p: argparse.ArgumentParser) -> None:
    """The filters ``requeue`` and ``dead`` share (all given must match)."""
    ids = _env("--id")
    p.add_argument(
        "--id",
        action="append",
        dest="ids",
        metavar="EVENT_ID",
        default=[i.strip() for i in ids.split(",") if i.strip()] if ids else None,
        help="event _id: matched as a string, and also as an ObjectId when it is 24 hex digits "
        "and as an integer when it is one; repeatable (env MONGO_OUTBOX_ID, comma-separated)",
    )
    p.add_argument("--type", dest="event_type", default=_env("--type"), help="event type")
    p.add_argument("--key", default=_env("--key"), help="ordering key")
    p.add_argument(
        "--older-than",
        type=_number(float, "--older-than"),
        metavar="SECONDS",
        default=_env("--older-than"),
        help="only events created more than SECONDS ago",
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        _fail(EXIT_CONFIG, f"{message} (see {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mongo-outbox",
        description="Transactional outbox for MongoDB: relay committed events to Pub/Sub.",
        epilog="Every flag can also be set as MONGO_OUTBOX_<FLAG>, e.g. MONGO_OUTBOX_MONGO_URI. "
        "Exit codes: 0 ok, 1 killed or unexpected, 2 bad configuration, 3 cannot connect, "
        "4 status --check failed.",
    )
    parser.add_argument("--version", action="version", version=f"mongo-outbox {__version__}")
    _add_log_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    relay = sub.add_parser(
        "relay",
        help="publish committed outbox events to Pub/Sub until stopped",
        description="Tail the outbox change stream and publish each event to Pub/Sub at least "
        "once, in order per key. SIGTERM/SIGINT: finish the batch, checkpoint, exit 0; a "
        "second signal exits at once. PUBSUB_EMULATOR_HOST is honoured.",
    )
    _add_mongo_flags(relay)
    relay.add_argument(
        "--project",
        default=_env("--project") or os.environ.get("GOOGLE_CLOUD_PROJECT"),
        help="Google Cloud project of the topics "
        "(env MONGO_OUTBOX_PROJECT or GOOGLE_CLOUD_PROJECT)",
    )
    relay.add_argument(
        "--default-topic",
        default=_env("--default-topic"),
        help="topic for events emitted without one",
    )
    relay.add_argument(
        "--name",
        default=_env("--name") or "default",
        help="relay name: its checkpoint is kept under this name (default: default)",
    )
    relay.add_argument(
        "--create-topics",
        action="store_true",
        default=None,
        help="create missing topics instead of failing their events",
    )
    relay.add_argument(
        "--once",
        action="store_true",
        default=None,
        help="publish what is pending and what has been committed, then exit",
    )
    relay.add_argument(
        "--batch-size",
        type=_number(int, "--batch-size"),
        default=_env("--batch-size") or "1000",
        help="events published and marked together (default 1000)",
    )
    relay.add_argument(
        "--max-batch-bytes",
        type=_number(int, "--max-batch-bytes"),
        default=_env("--max-batch-bytes") or "20000000",
        help="most bytes of events published together; the reader queue holds twice that, so "
        "memory stays bounded whatever the event size (default 20000000)",
    )
    relay.add_argument(
        "--isolate-after",
        type=_number(float, "--isolate-after"),
        default=_env("--isolate-after") or "30.0",
        help="seconds a topic may keep failing transiently before its events are set to wait "
        "so that other topics flow (default 30)",
    )
    relay.add_argument(
        "--http-port",
        type=_number(int, "--http-port"),
        default=_env("--http-port"),
        help="serve /metrics, /healthz and /readyz on this port (env MONGO_OUTBOX_HTTP_PORT; "
        "off by default)",
    )
    relay.add_argument(
        "--http-host",
        default=_env("--http-host") or "0.0.0.0",
        help="address the HTTP side listens on (default 0.0.0.0)",
    )
    relay.add_argument(
        "--unhealthy-after",
        type=_number(float, "--unhealthy-after"),
        default=_env("--unhealthy-after") or "60.0",
        help="/healthz answers 503 once the relay has made no progress, or its pipeline has kept "
        "failing, for this many seconds (default 60)",
    )
    relay.add_argument(
        "--max-attempts",
        type=_number(int, "--max-attempts"),
        default=_env("--max-attempts") or "10",
        help="failed attempts before an event becomes dead (default 10)",
    )
    relay.add_argument(
        "--lease-ttl",
        type=_number(float, "--lease-ttl"),
        default=_env("--lease-ttl") or "15.0",
        help="seconds a relay's lease lasts; a standby takes over after it expires (default 15)",
    )
    relay.add_argument(
        "--partitions",
        type=_number(int, "--partitions"),
        default=_env("--partitions") or "1",
        help="split the outbox into this many partitions shared by the relays of --name, each "
        "publishing its fair share (default 1: one relay publishes, the others stand by); "
        "every relay of a name must use the same number",
    )
    relay.add_argument(
        "--dead-key-policy",
        choices=["release", "hold"],
        default=_env("--dead-key-policy") or "release",
        help="release: a dead event lets later events of its key go on (default); hold: they "
        "wait until it is requeued",
    )

    init = sub.add_parser(
        "init",
        help="create the outbox collections and indexes",
        description="Create the outbox collection, its relay state collection and their "
        "indexes (idempotent). The application can do the same with ensure_indexes().",
    )
    _add_mongo_flags(init)
    init.add_argument(
        "--retention",
        default=_env("--retention"),
        metavar="DURATION",
        help="keep a TTL index deleting published events (and inbox records, when the inbox "
        "collection exists) this long after publication (processing): 7d, 36h, 90m... or off "
        "to remove it (env MONGO_OUTBOX_RETENTION)",
    )
    init.add_argument(
        "--inbox-collection",
        default=_env("--inbox-collection") or "inbox",
        help="the inbox collection --retention applies to (default inbox)",
    )
    init.add_argument(
        "--partitions",
        type=_number(int, "--partitions"),
        default=_env("--partitions") or "1",
        help="above 1, also create the index the partitions of a relay group sweep with "
        "(the relays create it too when they may)",
    )

    status = sub.add_parser(
        "status",
        help="pending, failing and dead counts, lag, checkpoint, relays",
        description="Show the outbox: events per status, pending events that have failed and "
        "why, the newest dead events, the age of the oldest pending event, the checkpoint and "
        "the relays holding a lease. With --check, exit 4 when events are dead or the oldest "
        "pending event is older than --max-lag: for scripts and alerts. A missing outbox "
        "collection is an error (exit 2); nothing is created.",
    )
    _add_mongo_flags(status)
    status.add_argument("--name", default=_env("--name") or "default", help="relay name")
    status.add_argument(
        "--json", action="store_true", default=None, help="print JSON (env MONGO_OUTBOX_JSON)"
    )
    status.add_argument(
        "--check",
        action="store_true",
        default=None,
        help="exit 4 when events are dead or the oldest pending event is older than --max-lag "
        "(env MONGO_OUTBOX_CHECK)",
    )
    status.add_argument(
        "--max-lag",
        type=_number(float, "--max-lag"),
        default=_env("--max-lag"),
        metavar="SECONDS",
        help="with --check: the age the oldest pending event may reach (implies --check; "
        "env MONGO_OUTBOX_MAX_LAG)",
    )

    checkpoint = sub.add_parser(
        "checkpoint",
        help="show or reset a relay's resume token",
        description="show (default): when the relay last saved its change stream position "
        "and the cluster time that position points at. reset: forget it, so that the next "
        "start opens the stream now and sweeps every pending event (gap-free).",
    )
    _add_mongo_flags(checkpoint)
    checkpoint.add_argument(
        "action",
        nargs="?",
        default="show",
        choices=["show", "reset"],
        help="show: the checkpoint's time and age; reset: forget the token; the next start "
        "runs the gap-free recovery sweep",
    )
    checkpoint.add_argument("--name", default=_env("--name") or "default", help="relay name")
    checkpoint.add_argument(
        "--json", action="store_true", default=None, help="print JSON (show only)"
    )

    dead = sub.add_parser(
        "dead",
        help="list dead events and why they died",
        description="List dead events, newest first, with their reasons. Filter as requeue "
        "does (all filters must match); then requeue them with the same filters.",
    )
    _add_mongo_flags(dead)
    _add_dead_filters(dead)
    dead.add_argument(
        "--limit",
        type=_number(int, "--limit"),
        default=_env("--limit") or "20",
        help="most events listed (default 20)",
    )
    dead.add_argument(
        "--json", action="store_true", default=None, help="print JSON (env MONGO_OUTBOX_JSON)"
    )

    requeue = sub.add_parser(
        "requeue",
        help="set dead events back to pending",
        description="Requeue dead events so the relay publishes them again (attempts restart "
        "from zero). Name events by --id, --type, --key, --older-than (all must match), or "
        "pass --all.",
    )
    _add_mongo_flags(requeue)
    _add_dead_filters(requeue)
    requeue.add_argument(
        "--all", action="store_true", default=None, help="every dead event (env MONGO_OUTBOX_ALL)"
    )

    sub.add_parser(
        "demo",
        help="run the whole flow on a throwaway replica set and Pub/Sub emulator",
        description="Start a single-node replica set and the Pub/Sub emulator, write orders with "
        "events, relay them and show them arriving on a subscription; then stop everything.",
    )
    for command in sub.choices.values():
        _add_log_flags(command)
    return parser


_BOOL_FLAGS = ("create_topics", "once", "json", "check", "all")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _resolve_env(args: argparse.Namespace) -> None:
    """Fill boolean flags from the environment and check what argparse does not."""
    for name in _BOOL_FLAGS:
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, _env_bool("--" + name.replace("_", "-")))
    if args.log_level not in _LOG_LEVELS:
        raise _Exit(
            EXIT_CONFIG, f"log level {args.log_level!r} is not one of {', '.join(_LOG_LEVELS)}"
        )
    if args.log_format not in LOG_FORMATS:
        raise _Exit(
            EXIT_CONFIG,
            f"{_env_name('--log-format')}={args.log_format!r} is not one of "
            f"{', '.join(LOG_FORMATS)}",
        )
    if getattr(args, "max_lag", None) is not None:
        args.check = True


def _connect(args: argparse.Namespace, *, need_database: bool = True) -> MongoClient[Any]:
    """A client of a reachable replica set; raises ConfigurationError or ConnectError."""
    if not args.mongo_uri:
        raise ConfigurationError("no MongoDB URI: pass --mongo-uri or set MONGO_OUTBOX_MONGO_URI")
    if need_database and not args.database:
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


def _cmd_init(args: argparse.Namespace) -> int:
    retention: float | Literal["off"] | None = None
    if args.retention is not None:
        try:
            retention = "off" if args.retention.strip() == "off" else parse_duration(args.retention)
        except ValueError as exc:
            raise _Exit(EXIT_CONFIG, f"--retention: {exc}") from exc
    client = _connect(args)
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


def _cmd_status(args: argparse.Namespace) -> int:
    client = _connect(args)
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
    problems = _check_problems(report, args.max_lag) if args.check else []
    if args.check:
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
    if args.check:
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


def _existing_outbox(client: MongoClient[Any], args: argparse.Namespace) -> OutboxAdmin:
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


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    if args.action == "show":
        return _checkpoint_show(args)
    client = _connect(args)
    try:
        reset = OutboxAdmin(client[args.database], args.collection).reset_token(args.name)
    finally:
        client.close()
    print(f"checkpoint of relay {args.name!r} " + ("reset" if reset else "was not set"))
    return EXIT_OK


def _checkpoint_show(args: argparse.Namespace) -> int:
    client = _connect(args)
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


def _cmd_dead(args: argparse.Namespace) -> int:
    ids = None if args.ids is None else [v for i in args.ids for v in _id_values(i)]
    client = _connect(args)
    try:
        admin = _existing_outbox(client, args)
        total, events = admin.dead_events(
            ids=ids,
            event_type=args.event_type,
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


def _cmd_requeue(args: argparse.Namespace) -> int:
    filters = (args.ids, args.event_type, args.key, args.older_than)
    if not args.all and all(f is None for f in filters):
        raise _Exit(
            EXIT_CONFIG,
            "say which dead events to requeue: --id, --type, --key, --older-than, or --all",
        )
    ids = None if args.ids is None else [v for i in args.ids for v in _id_values(i)]
    older = _older_than(args.older_than)
    client = _connect(args)
    try:
        admin = _existing_outbox(client, args)
        count = admin.requeue(ids=ids, event_type=args.event_type, key=args.key, older_than=older)
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


def _cmd_relay(args: argparse.Namespace) -> int:
    from .publishers import PubSubPublisher
    from .relay import Relay, RelayConfig

    if not args.project:
        raise _Exit(
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
        )
        if args.default_topic is not None:
            from ._event import check_topic

            check_topic(args.default_topic)
    except ValueError as exc:
        raise _Exit(EXIT_CONFIG, f"bad relay setting: {exc}") from exc
    if args.http_port is not None and args.http_port > 65535:
        raise _Exit(EXIT_CONFIG, f"--http-port {args.http_port} is not a port (1-65535)")
    client = _connect(args)
    publisher = PubSubPublisher(args.project, create_topics=args.create_topics)
    relay = Relay(client, publisher, config)
    server = None
    try:
        if args.http_port is not None:
            from .relay._http import RelayHTTPServer

            try:
                server = RelayHTTPServer(relay, args.http_host, args.http_port)
            except OSError as exc:
                raise _Exit(
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
        _install_signal_handlers(stop)
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
    finally:
        if server is not None:
            server.close()
        publisher.close()
        client.close()


def _install_signal_handlers(stop: threading.Event) -> None:
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            # Second signal: leave now; at-least-once delivery tolerates the lost batch.
            os._exit(EXIT_UNEXPECTED)
        log.info("%s received: finishing the batch, then exiting", signal.Signals(signum).name)
        # Not stop.set() here: the main thread may hold the event's lock at this very moment.
        threading.Thread(target=stop.set, name="outbox-stop").start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.log_level != "DEBUG":
        # The demo narrates; the relay's own INFO lines would only interleave with it.
        logging.getLogger("mongo_outbox").setLevel(logging.WARNING)
    return run_demo()


_COMMANDS = {
    "relay": _cmd_relay,
    "init": _cmd_init,
    "status": _cmd_status,
    "checkpoint": _cmd_checkpoint,
    "requeue": _cmd_requeue,
    "dead": _cmd_dead,
    "demo": _cmd_demo,
}


def _fail(code: int, message: str, *, as_log: bool = False) -> NoReturn:
    if as_log:  # --log-format json: the last line is a JSON log line too
        log.error("%s", message, extra={"exit_code": code})
    else:
        print(f"mongo-outbox: error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line flags, falling back to ``MONGO_OUTBOX_*`` environment variables.

    Exits with status 2 and a one-line reason on a bad flag or variable.
    """
    args = _build_parser().parse_args(argv)
    try:
        _resolve_env(args)
    except _Exit as exc:
        _fail(exc.code, str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mongo-outbox`` console script; returns the exit code."""
    args = parse_args(argv)
    if args.command is None:
        _build_parser().print_help()
        return EXIT_CONFIG
    with cli_logging(args.log_level, args.log_format, secrets=_uri_secrets(args)):
        return _run_command(args)


def _uri_secrets(args: argparse.Namespace) -> list[str]:
    """The MongoDB password, as written and decoded, for the log filter to scrub."""
    uri = getattr(args, "mongo_uri", None)
    if not uri:
        return []
    try:
        password = urlsplit(uri).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def _run_command(args: argparse.Namespace) -> int:
    as_log = args.log_format == "json"
    try:
        return _COMMANDS[args.command](args)
    except _Exit as exc:
        _fail(exc.code, str(exc), as_log=as_log)
    except ConfigurationError as exc:
        _fail(EXIT_CONFIG, str(exc), as_log=as_log)
    except ConnectError as exc:
        _fail(EXIT_CONNECT, str(exc), as_log=as_log)
    except ConnectionFailure as exc:
        _fail(EXIT_CONNECT, f"lost the connection to MongoDB: {str(exc)[:300]}", as_log=as_log)
    except PyMongoError as exc:
        _fail(EXIT_UNEXPECTED, f"MongoDB error: {type(exc).__name__}: {exc}", as_log=as_log)
    except DefaultCredentialsError as exc:
        _fail(
            EXIT_CONFIG,
            f"no Google Cloud credentials ({exc}): set GOOGLE_APPLICATION_CREDENTIALS, run "
            "where the metadata server answers, or set PUBSUB_EMULATOR_HOST for the emulator",
            as_log=as_log,
        )
    except Exception as exc:
        # Through the logger, so the traceback is redacted (and JSON with --log-format json).
        log.exception("unexpected error")
        _fail(EXIT_UNEXPECTED, f"unexpected error: {type(exc).__name__}: {exc}", as_log=as_log)


if __name__ == "__main__":
    sys.exit(main())
