"""Logs of the ``mongo-outbox`` command: JSON lines, ``event_id``, redacted credentials.

The end-to-end tests run the relay as a real process against the session's replica set (with a
user whose password must never be printed) and the Pub/Sub emulator.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from bson import ObjectId
from pymongo import MongoClient

from mongo_outbox import _logging, outbox_transaction
from mongo_outbox._document import build_document
from mongo_outbox.cli import main

SECRET = "Sup3r/Secret@Pw"
RFC3339_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("mongo_outbox.relay", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


# -- the JSON formatter ----------------------------------------------------------------------


def test_json_line_has_what_cloud_logging_reads(stream):
    import datetime as dt

    with _logging.cli_logging("INFO", "json", stream=stream):
        logging.getLogger("mongo_outbox.relay").warning("published %d events", 3)
        line_no = sys._getframe().f_lineno - 1
    line = stream.getvalue()
    assert line.count("\n") == 1
    entry = json.loads(line)
    assert entry["severity"] == "WARNING"
    assert entry["logger"] == "mongo_outbox.relay"
    assert entry["message"] == "published 3 events"
    assert re.match(RFC3339_UTC, entry["time"]), entry["time"]
    assert dt.datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).utcoffset().seconds == 0
    assert entry["logging.googleapis.com/sourceLocation"] == {
        "file": __file__,
        "line": str(line_no),
        "function": "test_json_line_has_what_cloud_logging_reads",
    }
    assert "level" not in entry
    assert "event_id" not in entry
    assert "stack_trace" not in entry
    assert not [k for k in entry if "trace" in k]


def test_json_line_carries_event_id_and_extras():
    oid = ObjectId()
    entry = json.loads(
        _logging.JsonFormatter().format(_record("event failed", event_id=oid, rate=1.5))
    )
    assert entry["event_id"] == str(oid)
    assert entry["rate"] == 1.5


def test_json_line_links_an_events_trace_in_the_project():
    record = _record("event failed", event_id=ObjectId(), traceparent=TRACEPARENT)
    entry = json.loads(_logging.JsonFormatter("my-project").format(record))
    assert entry["logging.googleapis.com/trace"] == (
        "projects/my-project/traces/4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert entry["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert entry["logging.googleapis.com/trace_sampled"] is True
    assert "traceparent" not in entry
    for odd in (None, "garbage", "00-" + "0" * 31 + "-x-01"):
        entry = json.loads(_logging.JsonFormatter("p").format(_record("x", traceparent=odd)))
        assert not [k for k in entry if "trace" in k or "span" in k.lower()], entry


def test_json_line_unfolds_pymongos_structured_message(stream):
    from pymongo.logger import LogMessage

    with _logging.cli_logging("DEBUG", "json", stream=stream):
        logging.getLogger("pymongo.command").debug(
            LogMessage(
                message="Command started",
                commandName="find",
                databaseName="shop",
                command={"find": "orders"},
                serverHost="db1",
            )
        )
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "Command started"
    assert entry["commandName"] == "find"
    assert entry["databaseName"] == "shop"
    assert entry["serverHost"] == "db1"
    assert entry["severity"] == "DEBUG"


def test_json_line_carries_the_exception_as_a_stack_trace():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = _logging.JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert isinstance(entry["stack_trace"], str)  # the field Error Reporting reads
    assert "RuntimeError: boom" in entry["stack_trace"]
    assert "Traceback" in entry["stack_trace"]


def test_json_lines_survive_odd_characters():
    line = _logging.JsonFormatter().format(_record("odd \u2028 sep \x00 and \u00e9"))
    assert len(line.splitlines()) == 1
    assert json.loads(line)["message"] == "odd \u2028 sep \x00 and \u00e9"


# -- redaction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        f"mongodb://alice:{quote(SECRET, safe='')}@db1:27017,db2:27017/?replicaSet=rs0",
        f"mongodb+srv://alice:{quote(SECRET, safe='')}@cluster0.example.net/shop",
        f"MONGODB://alice:{quote(SECRET, safe='')}@db1",
        "mongodb://alice:pa@ss@db1/",
    ],
    ids=["plain", "srv", "upper", "unescaped-at"],
)
def test_redact_scrubs_credentials(uri):
    text = _logging.redact(f"connecting to {uri} now")
    assert "alice" not in text
    assert quote(SECRET, safe="") not in text
    assert "pa@ss" not in text
    assert ":pa" not in text
    assert "***@" in text
    assert text.endswith(" now")


def test_redact_leaves_uris_without_credentials():
    text = "mongodb://db1:27017/?replicaSet=rs0 and mongodb+srv://cluster0.example.net/"
    assert _logging.redact(text) == text


def test_filter_scrubs_message_arguments_exception_and_known_secrets():
    uri = f"mongodb://alice:{quote(SECRET, safe='')}@db1/"
    log_filter = _logging.RedactingFilter(secrets=[SECRET, quote(SECRET, safe="")])
    try:
        raise ValueError(f"bad {uri}")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "using %s (%r)", (uri, SECRET), sys.exc_info()
        )
    record.__dict__["detail"] = f"pw={SECRET}"
    assert log_filter.filter(record)
    for formatter in (logging.Formatter(), _logging.JsonFormatter()):
        out = formatter.format(record)
        assert SECRET not in out
        assert quote(SECRET, safe="") not in out
        assert "mongodb://***@db1/" in out


# -- configuring the command's logging -------------------------------------------------------


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    return buffer


def test_cli_logging_installs_and_removes_its_handler(stream):
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with _logging.cli_logging("DEBUG", "json", secrets=[SECRET], stream=stream):
        assert root.level == logging.DEBUG
        logging.getLogger("mongo_outbox.test").debug(
            "uri mongodb://bob:%s@h/ and %s", SECRET, SECRET
        )
        logging.getLogger("pymongo.test").info("from a library", extra={"event_id": 7})
    assert (list(root.handlers), root.level) == before
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["logger"] for e in entries] == ["mongo_outbox.test", "pymongo.test"]
    assert [e["severity"] for e in entries] == ["DEBUG", "INFO"]
    assert entries[1]["event_id"] == "7"
    assert SECRET not in stream.getvalue()


def test_cli_logging_text_format(stream):
    with _logging.cli_logging("WARNING", "text", stream=stream):
        logging.getLogger("mongo_outbox.test").info("quiet")
        logging.getLogger("mongo_outbox.test").warning("loud mongodb://u:p@h/")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("WARNING mongo_outbox.test: loud mongodb://***@h/")


# -- the relay as a real process -------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_user(mongodb_uri) -> Iterator[tuple[str, str]]:
    """A user with a password on the session's replica set (its server does not enforce auth,
    but a client given credentials authenticates with them)."""
    user = f"outbox_log_{ObjectId()}"
    with MongoClient(mongodb_uri) as admin:
        admin.admin.command("createUser", user, pwd=SECRET, roles=["root"])
        try:
            yield user, SECRET
        finally:
            admin.admin.command("dropUser", user)


def _uri_with_password(mongodb_uri: str, user: str, password: str) -> str:
    scheme, rest = mongodb_uri.split("://", 1)
    return f"{scheme}://{user}:{quote(password, safe='')}@{rest}"


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_relay_logs_no_password_at_debug(
    log_format, secret_user, client, db_name, pubsub, mongodb_uri
):
    topic, _sub = pubsub.topic()
    with outbox_transaction(client, database=db_name) as tx:
        tx.emit("Ok", b"x", topic=topic, key="k")
        missing = tx.emit("Lost", b"x", topic="no-such-topic")
    # The trace context emit stores inside an OpenTelemetry span.
    client[db_name].outbox.update_one(
        {"_id": missing}, {"$set": {"trace": {"traceparent": TRACEPARENT}}}
    )
    poison = build_document("Poison", b"x")
    poison.pop("payload")
    client[db_name].outbox.insert_one(poison)
    uri = _uri_with_password(mongodb_uri, *secret_user)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGO_OUTBOX_")}
    env["MONGO_OUTBOX_LOG_FORMAT"] = log_format
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mongo_outbox.cli",
            "relay",
            "--log-level",
            "DEBUG",
            "--once",
            "--mongo-uri",
            uri,
            "--database",
            db_name,
            "--project",
            pubsub.project,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert client[db_name].outbox.find_one({"_id": missing})["attempts"] == 1
    for secret in (SECRET, quote(SECRET, safe="")):
        assert secret not in output
    lines = result.stderr.splitlines()
    assert any("DEBUG" in line for line in lines), output  # DEBUG was on
    if log_format == "json":
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert {"time", "severity", "logger", "message"} <= set(entries[0])
        ids = {e.get("event_id") for e in entries}
        assert str(missing) in ids  # "event ... failed"
        assert str(poison["_id"]) in ids  # "set aside as dead"
        [failed] = [e for e in entries if e.get("event_id") == str(missing)]
        trace_id, span_id = TRACEPARENT.split("-")[1:3]
        assert failed["logging.googleapis.com/trace"] == (
            f"projects/{pubsub.project}/traces/{trace_id}"
        )
        assert failed["logging.googleapis.com/spanId"] == span_id
    else:
        assert any(f"event {missing} failed" in line for line in lines), output


def test_main_logs_in_json_after_the_subcommand(capsys, mongodb_uri, outbox_database):
    code = main(
        [
            "init",
            "--log-format",
            "json",
            "--log-level",
            "DEBUG",
            "--mongo-uri",
            mongodb_uri,
            "--database",
            outbox_database,
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    entries = [json.loads(line) for line in err.splitlines()]
    assert entries, "DEBUG logging produced nothing"
    assert all(e["severity"] in {"DEBUG", "INFO", "WARNING", "ERROR"} for e in entries)
    # PyMongo's structured lines are fields, not JSON inside the message.
    commands = [e for e in entries if e["logger"] == "pymongo.command"]
    assert commands, [e["logger"] for e in entries]
    assert all(not e["message"].startswith("{") and "commandName" in e for e in commands)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--log-format", "json", "relay", "--no-such-flag"], {}),
        (["relay", "--log-format=json", "--batch-size", "0"], {}),
        (["status", "--no-such-flag"], {"MONGO_OUTBOX_LOG_FORMAT": "json"}),
    ],
    ids=["before", "after", "env"],
)
def test_usage_errors_are_json_lines_when_json_is_asked(argv, env, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [entry] = [json.loads(line) for line in captured.err.splitlines()]
    assert entry["severity"] == "ERROR"
    assert "--help" in entry["message"]
    assert entry["exit_code"] == 2
