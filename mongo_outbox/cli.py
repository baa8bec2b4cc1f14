"""The ``mongo-outbox`` command: relay, init, status, checkpoint, demo.

Every flag can also come from an environment variable ``MONGO_OUTBOX_<FLAG>`` (upper case,
dashes as underscores), e.g. ``MONGO_OUTBOX_MONGO_URI``. Exit codes: 0 ok, 1 killed or
unexpected error, 2 bad configuration, 3 cannot connect.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

from bson import ObjectId
from pymongo import MongoClient
from pymongo.errors import ConfigurationError as MongoConfigurationError
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from ._admin import OutboxAdmin, RelayInfo, shared_outbox_warning
from ._errors import ConfigurationError, ConnectError, LeaseLostError
from ._store import OutboxStore, ensure_indexes

__all__ = ["main", "parse_args"]

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_CONNECT = 3
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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        _fail(EXIT_CONFIG, f"{message} (see {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mongo-outbox",
        description="Transactional outbox for MongoDB: relay committed events to Pub/Sub.",
        epilog="Every flag can also be set as MONGO_OUTBOX_<FLAG>, e.g. MONGO_OUTBOX_MONGO_URI. "
        "Exit codes: 0 ok, 1 killed or unexpected, 2 bad configuration, 3 cannot connect.",
    )
    parser.add_argument(
        "--log-level",
        default=_env("--log-level") or "INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
    )
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
        "--dead-key-policy",
        choices=["release", "hold"],
        default=_env("--dead-key-policy") or "release",
        help="release: a dead event lets later events of its key go on (default); hold: they "
        "wait until it is requeued",
    )

    init = sub.add_parser("init", help="create the outbox collections and indexes")
    _add_mongo_flags(init)

    status = sub.add_parser("status", help="pending, published and dead counts, lag, checkpoint")
    _add_mongo_flags(status)
    status.add_argument("--name", default=_env("--name") or "default", help="relay name")
    status.add_argument(
        "--json", action="store_true", default=None, help="print JSON (env MONGO_OUTBOX_JSON)"
    )

    checkpoint = sub.add_parser("checkpoint", help="inspect or reset a relay's resume token")
    _add_mongo_flags(checkpoint)
    checkpoint.add_argument(
        "action",
        choices=["reset"],
        help="reset: forget the token; the next start runs the gap-free recovery sweep",
    )
    checkpoint.add_argument("--name", default=_env("--name") or "default", help="relay name")

    requeue = sub.add_parser(
        "requeue",
        help="set dead events back to pending",
        description="Requeue dead events so the relay publishes them again (attempts restart "
        "from zero). Name events by --id, --type, --key, --older-than (all must match), or "
        "pass --all.",
    )
    _add_mongo_flags(requeue)
    requeue.add_argument(
        "--id",
        action="append",
        dest="ids",
        metavar="EVENT_ID",
        help="event _id: matched as a string, and also as an ObjectId when it is 24 hex digits "
        "and as an integer when it is one; repeatable",
    )
    requeue.add_argument("--type", dest="event_type", help="event type")
    requeue.add_argument("--key", help="ordering key")
    requeue.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="only events created more than SECONDS ago",
    )
    requeue.add_argument("--all", action="store_true", help="every dead event")

    sub.add_parser(
        "demo",
        help="run the whole flow on a throwaway replica set and Pub/Sub emulator",
        description="Start a single-node replica set and the Pub/Sub emulator, write orders with "
        "events, relay them and show them arriving on a subscription; then stop everything.",
    )
    return parser


_BOOL_FLAGS = ("create_topics", "once", "json")
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
        raise ConfigurationError(
            f"MongoDB at {safe} is a standalone server; the outbox needs transactions and change "
            "streams, which need a replica set: start mongod with --replSet rs0 and run "
            "rs.initiate() (a single node is enough)",
        )
    return client


def _cmd_init(args: argparse.Namespace) -> int:
    client = _connect(args)
    try:
        ensure_indexes(client, args.database, args.collection)
    finally:
        client.close()
    print(f"outbox {args.database}.{args.collection} ready (collections and indexes)")
    return EXIT_OK


def _age(value: Any) -> float | None:
    if not isinstance(value, _dt.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    age: float = (_dt.datetime.now(_dt.timezone.utc) - value).total_seconds()
    return age


def _cmd_status(args: argparse.Namespace) -> int:
    client = _connect(args)
    try:
        admin = OutboxAdmin(client[args.database], args.collection)
        counts = admin.counts()
        oldest = admin.oldest_pending()
        state = OutboxStore(client[args.database], args.collection).load_state(args.name)
        errors = admin.newest_errors()
        relays = admin.active_relays()
    finally:
        client.close()
    live = [r for r in relays if r.live]
    warnings = [shared_outbox_warning([r.name for r in live], admin.name)] if len(live) > 1 else []
    report: dict[str, Any] = {
        "outbox": f"{args.database}.{args.collection}",
        **counts,
        "oldest_pending_age_s": _age(oldest.get("created_at")) if oldest else None,
        "relay": args.name,
        "has_checkpoint": state.get("resume_token") is not None,
        "checkpoint_age_s": _age(state.get("checkpoint_at")),
        "lease_owner": state.get("lease_owner"),
        "lease_expires_at": str(state["lease_expires_at"])
        if state.get("lease_expires_at")
        else None,
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
        "relays": [_relay_report(r) for r in relays],
        "live_relays": [r.name for r in live],
        "warnings": warnings,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK

    def fmt_age(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}s"

    print(f"outbox            {report['outbox']}")
    print(f"pending           {counts['pending']}")
    print(f"published         {counts['published']}")
    print(f"dead              {counts['dead']}")
    print(f"oldest pending    {fmt_age(report['oldest_pending_age_s'])}")
    checkpoint = fmt_age(report["checkpoint_age_s"]) if report["has_checkpoint"] else "none"
    print(f"checkpoint ({args.name})  {checkpoint}")
    print(f"lease owner       {report['lease_owner'] or '-'}")
    holders = ", ".join(f"{r.name} ({r.owner}, {r.lease_remaining or 0:.1f}s left)" for r in live)
    print(f"live relays       {holders or '-'}")
    for warning in warnings:
        print(f"warning: {warning}")
    for e in report["newest_dead"]:
        print(f"dead {e['id']} {e['type']} key={e['key']}: {e['error']}")
    return EXIT_OK


def _relay_report(relay: RelayInfo) -> dict[str, Any]:
    expires = relay.lease_expires_at
    return {
        "name": relay.name,
        "owner": relay.owner,
        "live": relay.live,
        "lease_expires_at": expires.isoformat() if expires else None,
        "lease_remaining_s": relay.lease_remaining,
        "checkpoint_age_s": _age(relay.checkpoint_at),
    }


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    client = _connect(args)
    try:
        reset = OutboxAdmin(client[args.database], args.collection).reset_token(args.name)
    finally:
        client.close()
    print(f"checkpoint of relay {args.name!r} " + ("reset" if reset else "was not set"))
    return EXIT_OK


def _cmd_requeue(args: argparse.Namespace) -> int:
    filters = (args.ids, args.event_type, args.key, args.older_than)
    if not args.all and all(f is None for f in filters):
        raise _Exit(
            EXIT_CONFIG,
            "say which dead events to requeue: --id, --type, --key, --older-than, or --all",
        )
    ids = None if args.ids is None else [v for i in args.ids for v in _id_values(i)]
    older = None
    if args.older_than is not None:
        older = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=args.older_than)
    client = _connect(args)
    try:
        admin = OutboxAdmin(client[args.database], args.collection)
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
            max_attempts=args.max_attempts,
            lease_ttl=args.lease_ttl,
            dead_key_policy=args.dead_key_policy,
        )
        if args.default_topic is not None:
            from ._event import check_topic

            check_topic(args.default_topic)
    except ValueError as exc:
        raise _Exit(EXIT_CONFIG, f"bad relay setting: {exc}") from exc
    client = _connect(args)
    publisher = PubSubPublisher(args.project, create_topics=args.create_topics)
    relay = Relay(client, publisher, config)
    try:
        if args.once:
            try:
                count = relay.run_once()
            except LeaseLostError as exc:
                log.warning("%s; nothing to do", exc)
                return EXIT_OK
            log.info("published %d events", count)
            return EXIT_OK
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
    "demo": _cmd_demo,
}


def _fail(code: int, message: str) -> NoReturn:
    print(f"mongo-outbox: error: {message}", file=sys.stderr)
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
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _COMMANDS[args.command](args)
    except _Exit as exc:
        _fail(exc.code, str(exc))
    except ConfigurationError as exc:
        _fail(EXIT_CONFIG, str(exc))
    except ConnectError as exc:
        _fail(EXIT_CONNECT, str(exc))
    except ConnectionFailure as exc:
        _fail(EXIT_CONNECT, f"lost the connection to MongoDB: {str(exc)[:300]}")
    except PyMongoError as exc:
        _fail(EXIT_UNEXPECTED, f"MongoDB error: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
