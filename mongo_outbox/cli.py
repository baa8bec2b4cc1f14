"""The ``mongo-outbox`` command (click): relay, init, status, checkpoint, dead, requeue, demo,
asyncapi.

Every option is also read from ``MONGO_OUTBOX_<FLAG>`` (upper case, dashes as underscores),
the same name in every command, e.g. ``MONGO_OUTBOX_MONGO_URI``; ``--help`` shows it. Exit
codes: 0 ok, 1 killed or unexpected error, 2 bad configuration or usage (a missing outbox
included), 3 cannot connect, 4 ``status --check`` failed. What the commands do is in
``_cli_commands``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click
from click.core import ParameterSource
from google.auth.exceptions import DefaultCredentialsError
from pymongo.errors import ConnectionFailure, PyMongoError

from . import __version__
from . import _cli_commands as commands
from ._cli_commands import EXIT_CONFIG, EXIT_CONNECT, EXIT_UNEXPECTED, Args
from ._errors import ConfigurationError, ConnectError
from ._formats import FORMATS
from ._logging import LOG_FORMATS, cli_logging
from ._redact import Redactor, redact_uri
from ._signals import own_process

__all__ = ["main", "parse_args", "redact_uri"]

ENV_PREFIX = "MONGO_OUTBOX_"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Positive(click.types.FloatParamType):
    """A positive float, or int when ``kind`` is int, with the messages the argparse CLI had."""

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind
        self.name = "integer" if kind is int else "number"
        self.what = "an integer" if kind is int else "a number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not {self.what}", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if number <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return number


class _Bool(click.types.BoolParamType):
    """A flag's environment value: 1/0, true/false, yes/no, on/off (an empty one is unset)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text in ("1", "true", "yes", "on")
        env = getattr(param, "envvar", None)
        raise click.UsageError(f"{env}={value!r} is not a boolean: use 1/0, true/false, yes/no")


class _Ids(click.types.StringParamType):
    envvar_list_splitter = ","  # MONGO_OUTBOX_ID=a,b as --id a --id b


def _option(flag: str, help: str, *, fallback_env: str | None = None, **kw: Any) -> click.Option:
    """An option also read from ``MONGO_OUTBOX_<FLAG>`` (then ``fallback_env``), shown in --help."""
    env = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
    envvar = [env, fallback_env] if fallback_env else env
    return click.Option([flag], help=help, envvar=envvar, show_envvar=True, show_default=True, **kw)


def _flag(flag: str, help: str) -> click.Option:
    return _option(flag, help, is_flag=True, type=_Bool())


def _log_options(*, top: bool) -> list[click.Option]:
    """``--log-level`` and ``--log-format``, accepted before and after the command: a command's
    copy has no default and wins only when given on its command line (see ``_args``)."""
    return [
        _option(
            "--log-level",
            "DEBUG, INFO, WARNING or ERROR",
            type=click.Choice(_LOG_LEVELS, case_sensitive=False),
            default="INFO" if top else None,
            metavar="LEVEL",
        ),
        _option(
            "--log-format",
            "text, or json: one JSON object per line",
            type=click.Choice(LOG_FORMATS, case_sensitive=False),
            default="text" if top else None,
            metavar="FORMAT",
        ),
    ]


_INT = _Positive(int)
_FLOAT = _Positive(float)

# Options more than one command takes: list them in each command's _command(...) below.
MONGO_OPTIONS = [
    _option("--mongo-uri", "MongoDB connection string of a replica set"),
    _option("--database", "database holding the outbox"),
    _option("--collection", "outbox collection", default="outbox"),
    _option(
        "--connect-timeout", "seconds to wait for MongoDB, then exit 3", type=_FLOAT, default=10.0
    ),
]
NAME = _option("--name", "relay name: its lease and checkpoint", default="default")
PUBLISH_OPTIONS = [
    _option("--project", "Google Cloud project of the topics", fallback_env="GOOGLE_CLOUD_PROJECT"),
    _option("--default-topic", "topic for events emitted without one"),
    _option(
        "--message-format",
        "outbox: outbox_* attributes; cloudevents: the CloudEvents Pub/Sub binding, binary mode "
        "(ce-* attributes)",
        type=click.Choice(FORMATS),
        default="outbox",
        metavar="FORMAT",
    ),
    _option(
        "--cloudevents-source",
        "ce-source of the cloudevents format [default: mongo-outbox://<database>/<collection>]",
        metavar="URI",
    ),
]
JSON = _flag("--json", "print JSON")
INBOX = _option(
    "--inbox-collection", "consumers' inbox collection (its retention)", default="inbox"
)
DEAD_FILTERS = [  # all given must match
    _option(
        "--id",
        "event _id: matched as a string, and also as an ObjectId when it is 24 hex digits and as "
        "an integer when it is one; repeatable (comma-separated in the variable)",
        type=_Ids(),
        multiple=True,
        metavar="EVENT_ID",
        callback=lambda _ctx, _param, ids: [i.strip() for i in ids if i.strip()] or None,
    ),
    _option("--type", "event type"),
    _option("--key", "ordering key"),
    _option(
        "--older-than", "only events created more than SECONDS ago", type=_FLOAT, metavar="SECONDS"
    ),
]


@click.group(
    "mongo-outbox",
    params=_log_options(top=True),
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nEvery option can also be set as MONGO_OUTBOX_<FLAG>, e.g. MONGO_OUTBOX_MONGO_URI."
    "\nExit codes: 0 ok, 1 killed or unexpected, 2 bad configuration or usage,"
    "\n3 cannot connect, 4 status --check failed.",
)
@click.version_option(__version__, prog_name="mongo-outbox", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, /, **_: Any) -> None:
    """Transactional outbox for MongoDB: relay committed events to Pub/Sub."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(EXIT_CONFIG)


_COMMANDS: dict[str, Callable[[Args], int]] = {}


def _command(run: Callable[[Args], int], short_help: str, *params: click.Parameter) -> None:
    """Declare the subcommand named after ``run``, its docstring as help; ``main`` calls ``run``
    with its settings."""
    params_ = [*params, *_log_options(top=False)]
    name, help = run.__name__, run.__doc__
    cli.add_command(
        click.Command(name, params=params_, callback=_args, help=help, short_help=short_help)
    )
    _COMMANDS[name] = run


def _args(**params: Any) -> Args:
    """Every command's callback: its settings, the group's log options unless given after it."""
    ctx = click.get_current_context()
    for name, value in ctx.find_root().params.items():
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            params[name] = value
    return Args(command=ctx.info_name, **params)


_command(
    commands.relay,
    "publish committed outbox events to Pub/Sub until stopped",
    *MONGO_OPTIONS,
    *PUBLISH_OPTIONS,
    NAME,
    _flag("--create-topics", "create missing topics instead of failing their events"),
    _flag("--once", "publish what is pending and what has been committed, then exit"),
    _option("--batch-size", "events published and marked together", type=_INT, default=1000),
    _option(
        "--max-batch-bytes",
        "most bytes of events published together; the reader queue holds twice that, so memory "
        "stays bounded whatever the event size",
        type=_INT,
        default=20_000_000,
    ),
    _option(
        "--isolate-after",
        "seconds a topic may keep failing transiently before its events are set to wait so that "
        "other topics flow",
        type=_FLOAT,
        default=30.0,
    ),
    _option(
        "--http-port",
        "serve /metrics, /healthz and /readyz on this port (off when not given)",
        type=click.IntRange(1, 65535),
    ),
    _option(
        "--http-host",
        "address the HTTP side listens on (0.0.0.0: every interface, what a pod's probes need)",
        default="0.0.0.0",
    ),
    _option(
        "--unhealthy-after",
        "/healthz answers 503 once the relay has made no progress (work MongoDB answered; none "
        "while its pipeline keeps failing) for this many seconds",
        type=_FLOAT,
        default=60.0,
    ),
    _option(
        "--max-attempts", "failed attempts before an event becomes dead", type=_INT, default=10
    ),
    _option(
        "--lease-ttl",
        "seconds a relay's lease lasts; a standby takes over after it expires",
        type=_FLOAT,
        default=15.0,
    ),
    _option(
        "--partitions",
        "split the outbox into this many partitions shared by the relays of --name, each "
        "publishing its fair share (1: one relay publishes, the others stand by); every relay of "
        "a name must use the same number",
        type=_INT,
        default=1,
    ),
    _option(
        "--dead-key-policy",
        "release: a dead event lets later events of its key go on; hold: they wait until it is "
        "requeued",
        type=click.Choice(["release", "hold"]),
        default="release",
        metavar="POLICY",
    ),
)
_command(
    commands.init,
    "create the outbox collections and indexes",
    *MONGO_OPTIONS,
    _option(
        "--retention",
        "keep a TTL index deleting published events (and inbox records, when the inbox "
        "collection exists) this long after publication (processing): 7d, 36h, 90m... or off to "
        "remove it",
        metavar="DURATION",
    ),
    INBOX,
    _option(
        "--partitions",
        "above 1, also create the index the partitions of a relay group sweep with (the relays "
        "create it too when they may)",
        type=_INT,
        default=1,
    ),
)
_command(
    commands.status,
    "pending, failing and dead counts, lag, checkpoint, relays",
    *MONGO_OPTIONS,
    NAME,
    JSON,
    INBOX,
    _flag(
        "--check", "exit 4 when events are dead or the oldest pending event is older than --max-lag"
    ),
    _option(
        "--max-lag",
        "with --check: the age the oldest pending event may reach (implies --check)",
        type=_FLOAT,
        metavar="SECONDS",
    ),
)
_command(
    commands.checkpoint,
    "show or reset a relay's resume token",
    click.Argument(
        ["action"], default="show", required=False, type=click.Choice(["show", "reset"])
    ),
    *MONGO_OPTIONS,
    NAME,
    JSON,
)
_command(
    commands.dead,
    "list dead events and why they died",
    *MONGO_OPTIONS,
    *DEAD_FILTERS,
    _option("--limit", "most events listed", type=_INT, default=20),
    JSON,
)
_command(
    commands.requeue,
    "set dead events back to pending",
    *MONGO_OPTIONS,
    *DEAD_FILTERS,
    _flag("--all", "every dead event"),
)
_command(
    commands.replay,
    "publish already-published events again",
    *MONGO_OPTIONS,
    *PUBLISH_OPTIONS,
    _option("--since", "from this time: ISO 8601 (UTC unless it says) or a duration ago (2h)"),
    _option("--until", "before this time: ISO 8601 or a duration ago"),
    *DEAD_FILTERS[:3],
    _option("--after", "only events after this one (go on from a stopped replay)", metavar="ID"),
    _option("--to-topic", "publish every event to this topic instead of its own"),
    _option("--rate", "most events published per second", type=_FLOAT, metavar="EVENTS"),
    _flag("--dry-run", "count the events per topic; publish nothing"),
)
_command(commands.demo, "run the whole flow on a throwaway replica set and Pub/Sub emulator")
_command(
    commands.asyncapi,
    "write an AsyncAPI 3.0 document of the events a module declares",
    click.Argument(["module"]),
    *PUBLISH_OPTIONS[2:],  # --message-format, --cloudevents-source
    _option(
        "--output",
        "file to write (JSON when it ends in .json, else YAML) [default: standard output]",
        type=click.Path(dir_okay=False, writable=True),
        metavar="FILE",
    ),
    _option("--title", "the document's info.title [default: <module> events]"),
    _option("--doc-version", "the document's info.version", default="1.0.0"),
)


def _fail(code: int, message: str, scrub: Redactor, *, as_log: bool = False) -> NoReturn:
    if as_log:  # --log-format json: the last line is a JSON log line too
        commands.log.error("%s", message, extra={"exit_code": code})
    else:
        print(f"mongo-outbox: error: {scrub(message)}", file=sys.stderr)
    raise SystemExit(code)


def _argv_redactor(argv: Sequence[str] | None) -> Redactor:
    """Every credential a command line or the environment may hold, before they are parsed."""
    words = sys.argv[1:] if argv is None else argv
    return Redactor.for_uris(
        os.environ.get("MONGO_OUTBOX_MONGO_URI"),
        *(word.partition("=")[2] or word for word in words if "://" in word),
    )


def _parse(argv: Sequence[str] | None) -> Args | int:
    """The settings of the command ``argv`` names, or the exit code of --help or --version."""
    try:
        result = cli.main(argv, "mongo-outbox", standalone_mode=False)
    except click.NoSuchOption as exc:  # in argparse's words, which scripts may know
        guess = f"; did you mean {' or '.join(exc.possibilities)}?" if exc.possibilities else ""
        _usage_error(
            EXIT_CONFIG, f"unrecognized arguments: {exc.option_name}{guess} {_see_help(exc)}", argv
        )
    except click.ClickException as exc:
        if isinstance(exc, click.BadParameter):
            _name_the_source(exc)
        _usage_error(exc.exit_code, f"{exc.format_message()} {_see_help(exc)}", argv)
    return result if isinstance(result, Args) else int(result or 0)


def _usage_error(code: int, message: str, argv: Sequence[str] | None) -> NoReturn:
    """Fail on a bad command line: a JSON log line when JSON logs were asked for (the command
    line could not be read, so its ``--log-format`` is looked for by hand), else plain text."""
    scrub = _argv_redactor(argv)
    if _json_asked(sys.argv[1:] if argv is None else argv):
        with cli_logging("ERROR", "json", secrets=scrub.secrets):
            _fail(code, message, scrub, as_log=True)
    _fail(code, message, scrub)


def _json_asked(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (or else ``MONGO_OUTBOX_LOG_FORMAT``) asks for JSON logs."""
    words, asked = list(argv), os.environ.get("MONGO_OUTBOX_LOG_FORMAT", "")
    for i, word in enumerate(words):  # the last one given wins, as the command's copy does
        if word.startswith("--log-format="):
            asked = word.split("=", 1)[1]
        elif word == "--log-format" and i + 1 < len(words):
            asked = words[i + 1]
    return asked.lower() == "json"


def _name_the_source(exc: click.BadParameter) -> None:
    """Name where an option's bad value came from: its flag, or its environment variable."""
    param, ctx = exc.param, exc.ctx
    if isinstance(param, click.Option) and param.name and ctx is not None:
        if ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT:
            exc.param_hint = param.envvar if isinstance(param.envvar, str) else str(param.envvar)
        else:
            exc.param_hint = param.opts


def _see_help(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    return f"(see {ctx.command_path if ctx else 'mongo-outbox'} --help)"


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """Parse command-line flags, falling back to ``MONGO_OUTBOX_*`` environment variables; exit
    2 with a one-line reason on a bad flag or variable."""
    parsed = _parse(argv)
    if isinstance(parsed, int):
        raise SystemExit(parsed)
    return parsed


def console() -> NoReturn:
    """Entry point of the ``mongo-outbox`` console script and ``python -m mongo_outbox.cli``:
    the process is ours, so the relay's signal handlers stay installed until it exits."""
    own_process()
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command as the console script would and return its exit code; called in-process,
    it leaves the caller's signal handlers as they were."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    scrub = Redactor.for_uris(getattr(args, "mongo_uri", None))
    project = getattr(args, "project", None)
    with cli_logging(args.log_level, args.log_format, secrets=scrub.secrets, project=project):
        return _run_command(args, functools.partial(_fail, scrub=scrub))


def _run_command(args: Args, fail: Callable[..., NoReturn]) -> int:
    as_log = args.log_format == "json"
    try:
        return _COMMANDS[args.command](args)
    except commands.CommandError as exc:
        fail(exc.code, str(exc), as_log=as_log)
    except ConfigurationError as exc:
        fail(EXIT_CONFIG, str(exc), as_log=as_log)
    except ConnectError as exc:
        fail(EXIT_CONNECT, str(exc), as_log=as_log)
    except ConnectionFailure as exc:
        fail(EXIT_CONNECT, f"lost the connection to MongoDB: {str(exc)[:300]}", as_log=as_log)
    except PyMongoError as exc:
        fail(EXIT_UNEXPECTED, f"MongoDB error: {type(exc).__name__}: {exc}", as_log=as_log)
    except DefaultCredentialsError as exc:
        fail(
            EXIT_CONFIG,
            f"no Google Cloud credentials ({exc}): set GOOGLE_APPLICATION_CREDENTIALS, run "
            "where the metadata server answers, or set PUBSUB_EMULATOR_HOST for the emulator",
            as_log=as_log,
        )
    except Exception as exc:
        # Through the logger, so the traceback is redacted (and JSON with --log-format json).
        commands.log.exception("unexpected error")
        fail(EXIT_UNEXPECTED, f"unexpected error: {type(exc).__name__}: {exc}", as_log=as_log)


if __name__ == "__main__":
    console()
