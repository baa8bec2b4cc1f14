"""Tests of the ``mongo-outbox`` command: in process through ``main`` and as a real process.

Connection tests use real servers: a closed port, a standalone ``mongod`` started here, and the
session's replica set from the plugin. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from helpers import free_port, run_cli, wait_for
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from mongo_outbox import ConfigurationError, ConnectError, _cli_commands, cli
from mongo_outbox._document import build_document
from mongo_outbox._retention import INBOX_TTL_INDEX, OUTBOX_TTL_INDEX
from mongo_outbox._store import PENDING_INDEX, SLOT_INDEX, OutboxStore, state_collection_name
from mongo_outbox.cli import main, parse_args
from mongo_outbox.relay._lease import Lease
from mongo_outbox.testing import find_mongod
from mongo_outbox.testing.plugin import REQUIRE_SERVICES_ENV, unavailable

# The documented commands, plus any the CLI has grown since.
COMMANDS = sorted({"relay", "init", "status", "checkpoint", "demo", *cli._COMMANDS})
SECRET = "Sup3rSecretPw"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No MONGO_OUTBOX_* or project settings from the caller's environment leak into a test."""
    for name in list(os.environ):
        if name.startswith("MONGO_OUTBOX_") and name != REQUIRE_SERVICES_ENV:
            monkeypatch.delenv(name)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MONGO_OUTBOX_") and k != "GOOGLE_CLOUD_PROJECT"
    }
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str] | None = None, script: bool = False, timeout=60):
    """Run the real command in a new process; ``script`` uses the installed console script."""
    if script:
        exe = Path(sys.executable).parent / "mongo-outbox"
        command = [str(exe), *args]
    else:
        command = [sys.executable, "-m", "mongo_outbox.cli", *args]
    return subprocess.run(
        command,
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound by us but not listening: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- help and argument errors ----------------------------------------------------------------


def test_help_mentions_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command
    assert "MONGO_OUTBOX_" in out
    assert "3 cannot connect" in out


@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_help_from_the_real_command(script):
    if script:
        assert shutil.which("mongo-outbox", path=str(Path(sys.executable).parent))
    result = _run("--help", script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: mongo-outbox")
    for command in COMMANDS:
        assert command in result.stdout


def test_relay_help_lists_the_contract_flags(capsys):
    code, out, _ = run_cli(["relay", "--help"], capsys)
    assert code == 0
    for flag in [
        "--mongo-uri",
        "--database",
        "--collection",
        "--project",
        "--default-topic",
        "--name",
        "--create-topics",
        "--once",
    ]:
        assert flag in out


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    out, _ = capsys.readouterr()
    assert out.startswith("Usage: mongo-outbox")
    for command in COMMANDS:
        assert command in out


def test_no_command_as_a_process():
    result = _run()
    assert result.returncode == 2
    assert "Usage: mongo-outbox" in result.stdout


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["init", "--bogus"], ["frobnicate"], ["checkpoint", "explode"]],
    ids=["top-flag", "sub-flag", "command", "checkpoint-action"],
)
def test_bad_arguments_exit_2(argv, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("mongo-outbox: error:")
    assert "--help" in line


def test_unknown_flag_as_a_process():
    result = _run("status", "--no-such-flag", script=True)
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


# -- missing settings ------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mongo-outbox: error: ")
    return lines[0]


def test_relay_without_uri(capsys):
    code, _, err = run_cli(["relay", "--project", "p", "--database", "d"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("mongo-outbox: error: no MongoDB URI")
    assert "--mongo-uri" in line
    assert "MONGO_OUTBOX_MONGO_URI" in line


def test_relay_without_uri_as_a_process():
    result = _run("relay", "--project", "p")
    assert result.returncode == 2
    assert result.stdout == ""
    assert _one_error_line(result.stderr).startswith("mongo-outbox: error: no MongoDB URI")


def test_relay_without_project(capsys):
    code, _, err = run_cli(["relay", "--mongo-uri", "mongodb://x", "--database", "d"], capsys)
    assert code == 2
    assert "no Google Cloud project" in _one_error_line(err)


@pytest.mark.parametrize("command", [["init"], ["status"], ["checkpoint", "reset"]])
def test_commands_without_uri_or_database(command, capsys):
    code, _, err = run_cli(command, capsys)
    assert code == 2
    assert "no MongoDB URI" in _one_error_line(err)
    # The database is checked before connecting: no wait on an unreachable server.
    code, _, err = run_cli([*command, "--mongo-uri", "mongodb://127.0.0.1:1"], capsys)
    assert code == 2
    assert "no database" in _one_error_line(err)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--batch-size", "0"], "'0' must be positive"),
        (["--batch-size", "10001"], "bad relay setting: batch_size must be between 1 and 10000"),
        (["--max-attempts", "0"], "'0' must be positive"),
        (["--max-batch-bytes", "0"], "'0' must be positive"),
        (["--max-batch-bytes", "1e6"], "'1e6' is not an integer"),
        (["--isolate-after", "soon"], "'soon' is not a number"),
        (["--default-topic", "goog-topic"], "bad relay setting: invalid topic"),
        (["--partitions", "0"], "'0' must be positive"),
        (["--partitions", "1025"], "bad relay setting: partitions must be between 1 and 1024"),
    ],
)
def test_bad_relay_settings_exit_2_before_connecting(flags, match, capsys):
    started = time.monotonic()
    argv = ["relay", "--project", "p", "--mongo-uri", "mongodb://127.0.0.1:1", "--database", "d"]
    code, _, err = run_cli([*argv, *flags], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert match in line
    assert time.monotonic() - started < 5  # did not try to reach the server first


# -- environment variables -------------------------------------------------------------------


def test_relay_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MONGO_OUTBOX_MONGO_URI", "mongodb://db.example:27017/?replicaSet=rs0")
    monkeypatch.setenv("MONGO_OUTBOX_DATABASE", "shop")
    monkeypatch.setenv("MONGO_OUTBOX_COLLECTION", "events")
    monkeypatch.setenv("MONGO_OUTBOX_PROJECT", "my-proj")
    monkeypatch.setenv("MONGO_OUTBOX_DEFAULT_TOPIC", "orders")
    monkeypatch.setenv("MONGO_OUTBOX_NAME", "relay-2")
    monkeypatch.setenv("MONGO_OUTBOX_CREATE_TOPICS", "1")
    monkeypatch.setenv("MONGO_OUTBOX_ONCE", "yes")
    monkeypatch.setenv("MONGO_OUTBOX_BATCH_SIZE", "42")
    monkeypatch.setenv("MONGO_OUTBOX_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("MONGO_OUTBOX_CONNECT_TIMEOUT", "2.5")
    args = parse_args(["relay"])
    assert args.command == "relay"
    assert args.mongo_uri == "mongodb://db.example:27017/?replicaSet=rs0"
    assert args.database == "shop"
    assert args.collection == "events"
    assert args.project == "my-proj"
    assert args.default_topic == "orders"
    assert args.name == "relay-2"
    assert args.create_topics is True
    assert args.once is True
    assert args.batch_size == 42
    assert args.max_attempts == 3
    assert args.connect_timeout == 2.5


def test_defaults_without_environment():
    args = parse_args(["relay"])
    assert args.mongo_uri is None
    assert args.database is None
    assert args.collection == "outbox"
    assert args.project is None
    assert args.name == "default"
    assert args.create_topics is False
    assert args.once is False
    assert args.batch_size == 1000
    assert args.connect_timeout == 10.0


def test_google_cloud_project_is_a_fallback(monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "gcp-proj")
    assert parse_args(["relay"]).project == "gcp-proj"
    monkeypatch.setenv("MONGO_OUTBOX_PROJECT", "outbox-proj")
    assert parse_args(["relay"]).project == "outbox-proj"


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("MONGO_OUTBOX_MONGO_URI", "mongodb://env:1")
    monkeypatch.setenv("MONGO_OUTBOX_DATABASE", "env_db")
    args = parse_args(["status", "--mongo-uri", "mongodb://flag:2", "--database", "flag_db"])
    assert args.mongo_uri == "mongodb://flag:2"
    assert args.database == "flag_db"


@pytest.mark.parametrize("command", [["init"], ["status"], ["checkpoint", "reset"]])
def test_mongo_settings_from_the_environment_for_every_command(command, monkeypatch):
    monkeypatch.setenv("MONGO_OUTBOX_MONGO_URI", "mongodb://env:1")
    monkeypatch.setenv("MONGO_OUTBOX_DATABASE", "env_db")
    args = parse_args(command)
    assert args.mongo_uri == "mongodb://env:1"
    assert args.database == "env_db"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_boolean_environment_values(value, expected, monkeypatch):
    monkeypatch.setenv("MONGO_OUTBOX_ONCE", value)
    monkeypatch.setenv("MONGO_OUTBOX_CREATE_TOPICS", value)
    args = parse_args(["relay"])
    assert args.once is expected
    assert args.create_topics is expected


@pytest.mark.parametrize("var", ["MONGO_OUTBOX_ONCE", "MONGO_OUTBOX_CREATE_TOPICS"])
def test_bad_boolean_environment_value_exits_2(var, monkeypatch, capsys):
    monkeypatch.setenv(var, "maybe")
    code, _, err = run_cli(["relay", "--project", "p"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"{var}='maybe' is not a boolean" in line


def test_bad_boolean_environment_value_as_a_process():
    result = _run("relay", env=_env(MONGO_OUTBOX_ONCE="sometimes"))
    assert result.returncode == 2
    assert "MONGO_OUTBOX_ONCE='sometimes' is not a boolean" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_json_flag_from_the_environment(monkeypatch):
    monkeypatch.setenv("MONGO_OUTBOX_JSON", "1")
    assert parse_args(["status"]).json is True


@pytest.mark.parametrize(
    "var",
    [
        "MONGO_OUTBOX_CONNECT_TIMEOUT",
        "MONGO_OUTBOX_BATCH_SIZE",
        "MONGO_OUTBOX_MAX_ATTEMPTS",
        "MONGO_OUTBOX_LEASE_TTL",
    ],
)
def test_bad_numeric_environment_value_exits_2(var):
    args = ("--project", "p", "--mongo-uri", "mongodb://127.0.0.1:1", "--database", "d")
    result = _run("relay", *args, env=_env(**{var: "lots"}))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2
    assert var in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_relay_only_variables_do_not_break_other_commands():
    result = _run("init", env=_env(MONGO_OUTBOX_BATCH_SIZE="lots", MONGO_OUTBOX_ONCE="maybe"))
    assert "MONGO_OUTBOX_BATCH_SIZE" not in result.stderr
    assert "MONGO_OUTBOX_ONCE" not in result.stderr


def test_bad_log_level_environment_value_exits_2():
    result = _run("init", env=_env(MONGO_OUTBOX_LOG_LEVEL="verbose"))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2


# -- connecting ------------------------------------------------------------------------------


def test_unreachable_server_exits_3_naming_the_host(closed_port, capsys):
    uri = f"mongodb://127.0.0.1:{closed_port}/?serverSelectionTimeoutMS=500"
    started = time.monotonic()
    code, _, err = run_cli(
        ["status", "--mongo-uri", uri, "--database", "d", "--connect-timeout", "1"], capsys
    )
    assert code == 3
    line = _one_error_line(err)
    assert "cannot connect to MongoDB" in line
    assert f"127.0.0.1:{closed_port}" in line
    assert time.monotonic() - started < 10  # --connect-timeout 1 was honoured


@pytest.mark.parametrize("command", [["init"], ["relay", "--project", "p"]])
def test_unreachable_server_as_a_process(command, closed_port):
    uri = f"mongodb://127.0.0.1:{closed_port}/?serverSelectionTimeoutMS=500"
    result = _run(*command, "--mongo-uri", uri, "--database", "d", "--connect-timeout", "1")
    assert result.returncode == 3, result.stderr
    assert f"127.0.0.1:{closed_port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "userinfo",
    [f"alice:{SECRET}", f"alice:{SECRET}%40x"],
    ids=["plain", "escaped"],
)
def test_password_is_never_printed_when_unreachable(userinfo, closed_port):
    uri = f"mongodb://{userinfo}@127.0.0.1:{closed_port}/?serverSelectionTimeoutMS=500"
    result = _run(
        "--log-level",
        "DEBUG",
        "relay",
        "--project",
        "p",
        "--mongo-uri",
        uri,
        "--database",
        "d",
        "--connect-timeout",
        "1",
    )
    assert result.returncode == 3, result.stderr
    assert f"127.0.0.1:{closed_port}" in result.stderr
    assert SECRET not in result.stderr
    assert SECRET not in result.stdout


@pytest.mark.parametrize(
    "uri",
    [
        f"mongodb://alice:{SECRET}@127.0.0.1:notaport/",
        f"mongodb://alice:{SECRET}@127.0.0.1:99999/",
        f"mongodb://alice:{SECRET}@[::1:27017/",
        f"mongodb+srv://alice:{SECRET}@host:27017/",
    ],
    ids=["port", "port-range", "ipv6", "srv-port"],
)
def test_password_is_never_printed_for_an_invalid_uri(uri, capsys):
    code, out, err = run_cli(["init", "--mongo-uri", uri, "--database", "d"], capsys)
    assert code == 2
    assert "invalid MongoDB URI" in _one_error_line(err)
    assert SECRET not in err
    assert SECRET not in out


def test_invalid_uri_exits_2(capsys):
    code, _, err = run_cli(["init", "--mongo-uri", "notmongo://x", "--database", "d"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "invalid MongoDB URI" in line
    assert "notmongo://x" in line


def test_invalid_uri_as_a_process():
    result = _run(
        "relay", "--project", "p", "--mongo-uri", "notmongo://x", "--database", "d", script=True
    )
    assert result.returncode == 2
    assert "invalid MongoDB URI" in _one_error_line(result.stderr)


# -- a standalone server ---------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_standalone(mongod: str, dbpath: Path) -> tuple[subprocess.Popen, int]:
    """Start ``mongod`` without ``--replSet``; return it once it answers ``ping``."""
    log = dbpath / "mongod.log"
    for _ in range(3):  # the port may be taken between choosing and binding it
        port = free_port()
        proc = subprocess.Popen(
            [
                mongod,
                "--port",
                str(port),
                "--dbpath",
                str(dbpath),
                "--bind_ip",
                "127.0.0.1",
                "--wiredTigerCacheSizeGB",
                "0.25",
                "--logpath",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client: MongoClient = MongoClient(
            f"mongodb://127.0.0.1:{port}/?directConnection=true",
            serverSelectionTimeoutMS=250,
            connectTimeoutMS=250,
        )
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if client.admin.command("ping").get("ok") == 1:
                        return proc, port
                except PyMongoError:
                    time.sleep(0.05)  # poll interval; server selection already waited
        except BaseException:
            _stop(proc)
            raise
        finally:
            client.close()
        _stop(proc)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        if "Address already in use" not in tail:
            pytest.fail(f"standalone mongod did not answer ping:\n{tail}")
    pytest.fail("standalone mongod could not bind a port")


@pytest.fixture(scope="module")
def standalone_uri(tmp_path_factory) -> Iterator[str]:
    mongod = find_mongod()
    if mongod is None:
        unavailable("no mongod binary found for the standalone server test")
    proc, port = _start_standalone(mongod, tmp_path_factory.mktemp("standalone"))
    try:
        yield f"mongodb://127.0.0.1:{port}/"
    finally:
        _stop(proc)
        assert proc.returncode is not None


@pytest.mark.parametrize("command", [["init"], ["status"], ["relay", "--project", "p"]])
def test_standalone_server_exits_2_asking_for_a_replica_set(command, standalone_uri, capsys):
    code, _, err = run_cli(
        [*command, "--mongo-uri", standalone_uri, "--database", "d", "--connect-timeout", "5"],
        capsys,
    )
    assert code == 2
    line = _one_error_line(err)
    assert "standalone" in line
    assert "replica set" in line
    assert "--replSet" in line


def test_standalone_server_is_left_untouched(standalone_uri, capsys):
    code, _, _ = run_cli(["init", "--mongo-uri", standalone_uri, "--database", "untouched"], capsys)
    assert code == 2
    with contextlib.closing(MongoClient(standalone_uri, serverSelectionTimeoutMS=5000)) as client:
        assert "untouched" not in client.list_database_names()


# -- a real replica set ----------------------------------------------------------------------


def _seed(client: MongoClient, database: str) -> dict[str, list]:
    """Two pending, one published and one dead event in ``database.outbox``."""
    docs = [build_document("OrderCreated", {"n": n}, key=f"order-{n}") for n in range(4)]
    docs[2]["status"] = "published"
    docs[3].update(status="dead", attempts=10, last_error="topic refused")
    client[database].outbox.insert_many(docs)
    return {"ids": [d["_id"] for d in docs]}


def test_init_then_status(mongodb_uri, outbox_database, mongo_client, capsys):
    base = ["--mongo-uri", mongodb_uri, "--database", outbox_database]
    code, out, err = run_cli(["init", *base], capsys)
    assert code == 0, err
    assert f"{outbox_database}.outbox ready" in out
    db = mongo_client[outbox_database]
    assert {"outbox", "outbox_relay_state"} <= set(db.list_collection_names())
    assert PENDING_INDEX in db.outbox.index_information()

    code, out, err = run_cli(["status", *base], capsys)
    assert code == 0, err
    assert re.search(r"^pending\s+0$", out, re.MULTILINE), out
    assert re.search(r"^dead\s+0$", out, re.MULTILINE), out
    assert re.search(r"^checkpoint \(default\)\s+none$", out, re.MULTILINE), out

    seeded = _seed(mongo_client, outbox_database)
    code, out, err = run_cli(["status", *base], capsys)
    assert code == 0, err
    assert re.search(r"^pending\s+2$", out, re.MULTILINE), out
    assert re.search(r"^published\s+1$", out, re.MULTILINE), out
    assert re.search(r"^dead\s+1$", out, re.MULTILINE), out
    assert re.search(r"^oldest pending\s+\d+\.\ds$", out, re.MULTILINE), out
    assert f"dead {seeded['ids'][3]} OrderCreated key=order-3: topic refused" in out


def test_init_with_partitions_creates_the_index_of_their_sweeps(
    mongodb_uri, outbox_database, mongo_client, capsys
):
    base = ["--mongo-uri", mongodb_uri, "--database", outbox_database]
    assert run_cli(["init", *base], capsys)[0] == 0
    assert SLOT_INDEX not in mongo_client[outbox_database].outbox.index_information()
    assert run_cli(["init", *base, "--partitions", "4"], capsys)[0] == 0
    index = mongo_client[outbox_database].outbox.index_information()[SLOT_INDEX]
    assert index["key"] == [("status", 1), ("slot", 1), ("_id", 1)]


def test_init_retention_keeps_changes_and_removes_the_ttl_indexes(
    mongodb_uri, outbox_database, mongo_client, capsys
):
    base = ["--mongo-uri", mongodb_uri, "--database", outbox_database]
    db = mongo_client[outbox_database]
    db.create_collection("inbox")
    code, out, err = run_cli(["init", *base, "--retention", "7d"], capsys)
    assert code == 0, err
    assert "retention 7d" in out
    assert db.outbox.index_information()[OUTBOX_TTL_INDEX]["expireAfterSeconds"] == 604800
    assert db.inbox.index_information()[INBOX_TTL_INDEX]["expireAfterSeconds"] == 604800
    assert run_cli(["init", *base, "--retention", "36h"], capsys)[0] == 0
    assert db.outbox.index_information()[OUTBOX_TTL_INDEX]["expireAfterSeconds"] == 129600
    code, out, _ = run_cli(["status", *base], capsys)
    assert re.search(r"^retention\s+outbox 36h, inbox 36h$", out, re.MULTILINE), out
    assert run_cli(["init", *base, "--retention", "off"], capsys)[0] == 0
    assert OUTBOX_TTL_INDEX not in db.outbox.index_information()
    assert INBOX_TTL_INDEX not in db.inbox.index_information()
    code, out, _ = run_cli(["status", *base], capsys)
    assert re.search(r"^retention\s+outbox none, inbox none$", out, re.MULTILINE), out


def test_init_with_a_bad_retention_exits_2_before_connecting(capsys):
    argv = ["init", "--mongo-uri", "mongodb://127.0.0.1:1", "--database", "d"]
    code, _, err = run_cli([*argv, "--retention", "a week"], capsys)
    assert code == 2
    assert "--retention: 'a week' is not a duration" in _one_error_line(err)


def test_init_is_idempotent_as_a_process(mongodb_uri, outbox_database, mongo_client):
    for _ in range(2):
        result = _run(
            "init",
            env=_env(MONGO_OUTBOX_MONGO_URI=mongodb_uri, MONGO_OUTBOX_DATABASE=outbox_database),
            script=True,
        )
        assert result.returncode == 0, result.stderr
    assert PENDING_INDEX in mongo_client[outbox_database].outbox.index_information()


def test_status_json(mongodb_uri, outbox_database, mongo_client):
    seeded = _seed(mongo_client, outbox_database)
    OutboxStore(mongo_client[outbox_database]).save_token(
        "default", {"_data": "00"}, dt.datetime.now(dt.timezone.utc)
    )
    result = _run("status", "--json", "--mongo-uri", mongodb_uri, "--database", outbox_database)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pending"] == 2
    assert report["published"] == 1
    assert report["dead"] == 1
    assert report["outbox"] == f"{outbox_database}.outbox"
    assert report["relay"] == "default"
    assert report["has_checkpoint"] is True
    assert 0 <= report["checkpoint_age_s"] < 300
    assert 0 <= report["oldest_pending_age_s"] < 300
    assert report["newest_dead"] == [
        {
            "id": str(seeded["ids"][3]),
            "type": "OrderCreated",
            "key": "order-3",
            "attempts": 10,
            "error": "topic refused",
        }
    ]


def test_status_json_of_an_empty_outbox(mongodb_uri, db_name, capsys):
    code, out, err = run_cli(
        ["status", "--json", "--mongo-uri", mongodb_uri, "--database", db_name], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert (report["pending"], report["published"], report["dead"]) == (0, 0, 0)
    assert report["oldest_pending_age_s"] is None
    assert report["has_checkpoint"] is False
    assert report["newest_dead"] == []


def test_checkpoint_reset(mongodb_uri, outbox_database, mongo_client, capsys):
    store = OutboxStore(mongo_client[outbox_database])
    now = dt.datetime.now(dt.timezone.utc)
    store.save_token("default", {"_data": "01"}, now)
    store.save_token("other", {"_data": "02"}, now)
    base = ["--mongo-uri", mongodb_uri, "--database", outbox_database]

    code, out, err = run_cli(["checkpoint", "reset", *base], capsys)
    assert code == 0, err
    assert out.strip() == "checkpoint of relay 'default' reset"
    assert "resume_token" not in store.load_state("default")
    assert store.load_state("other")["resume_token"] == {"_data": "02"}

    code, out, err = run_cli(["checkpoint", "reset", *base], capsys)
    assert code == 0, err
    assert out.strip() == "checkpoint of relay 'default' was not set"

    code, out, err = run_cli(["checkpoint", "reset", "--name", "other", *base], capsys)
    assert code == 0, err
    assert "resume_token" not in store.load_state("other")


def _dead_docs(client: MongoClient, database: str) -> list:
    """Dead events whose ``_id`` is a string, an int and an ObjectId (a poison doc may be any)."""
    docs = [build_document("OrderCreated", {"n": n}, key=f"order-{n}") for n in range(3)]
    for doc, _id in zip(docs, ["abc", 42, docs[2]["_id"]], strict=True):
        doc.update(_id=_id, status="dead", attempts=10, last_error=f"refused {_id}")
    client[database].outbox.insert_many(docs)
    return [d["_id"] for d in docs]


def test_requeue_by_id_of_any_type(mongodb_uri, outbox_database, mongo_client, capsys):
    ids = _dead_docs(mongo_client, outbox_database)
    outbox = mongo_client[outbox_database].outbox
    base = ["requeue", "--mongo-uri", mongodb_uri, "--database", outbox_database]

    def statuses() -> dict:
        return {d["_id"]: d["status"] for d in outbox.find({}, {"status": 1})}

    code, out, err = run_cli([*base, "--id", "abc"], capsys)
    assert code == 0, err
    assert out.strip() == "requeued 1 dead event"
    assert statuses() == {"abc": "pending", 42: "dead", ids[2]: "dead"}

    code, out, err = run_cli([*base, "--id", "42"], capsys)
    assert code == 0, err
    assert out.strip() == "requeued 1 dead event"
    assert statuses() == {"abc": "pending", 42: "pending", ids[2]: "dead"}

    code, out, err = run_cli([*base, "--id", "nothing-like-it", "--id", "7"], capsys)
    assert code == 0, err
    assert out.strip() == "requeued 0 dead events"

    code, out, err = run_cli([*base, "--id", str(ids[2]).upper()], capsys)
    assert code == 0, err
    assert out.strip() == "requeued 1 dead event"
    assert set(statuses().values()) == {"pending"}


def test_requeue_matches_a_hex_id_stored_as_a_string(mongodb_uri, outbox_database, mongo_client):
    hex_id = "0123456789abcdef01234567"
    doc = build_document("E", b"x")
    doc.update(_id=hex_id, status="dead")
    mongo_client[outbox_database].outbox.insert_one(doc)
    result = _run(
        "requeue", "--id", hex_id, "--mongo-uri", mongodb_uri, "--database", outbox_database
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "requeued 1 dead event"


def test_status_prints_dead_events_of_any_id_type(mongodb_uri, outbox_database, mongo_client):
    _dead_docs(mongo_client, outbox_database)
    base = ["status", "--mongo-uri", mongodb_uri, "--database", outbox_database]
    result = _run(*base)
    assert result.returncode == 0, result.stderr
    assert "dead abc OrderCreated key=order-0: refused abc" in result.stdout
    assert "dead 42 OrderCreated key=order-1: refused 42" in result.stdout
    result = _run(*base, "--json")
    assert result.returncode == 0, result.stderr
    assert {"abc", "42"} <= {e["id"] for e in json.loads(result.stdout)["newest_dead"]}


def test_status_shows_live_relays_and_warns_about_two_names(
    mongodb_uri, db_name, mongo_client, capsys
):
    state = mongo_client[db_name][state_collection_name("outbox")]
    for name, owner in [("default", "host:1"), ("billing", "host:2")]:
        assert Lease(state, name, owner, ttl=60).try_acquire()
    state.insert_one({"_id": "old", "lease_owner": "host:3", "fence": 2})  # no live lease
    base = ["status", "--mongo-uri", mongodb_uri, "--database", db_name]
    warning = (
        f"relay names billing and default both publish from outbox {db_name}.outbox: "
        "every event is published by each; give them the same --name (one active, others "
        "standby)"
    )

    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert re.search(
        r"^live relays\s+billing \(host:2, \d+\.\ds left\), default \(host:1, \d+\.\ds left\)$",
        out,
        re.MULTILINE,
    ), out
    assert f"warning: {warning}" in out.splitlines()

    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    relays = {r["name"]: r for r in report["relays"]}
    assert set(relays) == {"billing", "default", "old"}
    assert relays["default"]["live"] is True
    assert relays["default"]["owner"] == "host:1"
    assert 0 < relays["default"]["lease_remaining_s"] <= 60
    assert relays["old"]["live"] is False
    assert report["live_relays"] == ["billing", "default"]
    assert report["warnings"] == [warning]


def test_status_with_one_live_relay_warns_of_nothing(mongodb_uri, db_name, mongo_client):
    state = mongo_client[db_name][state_collection_name("outbox")]
    assert Lease(state, "default", "host:1", ttl=60).try_acquire()
    assert Lease(state, "default", "host:2", ttl=60).try_acquire() is False  # a standby
    result = _run("status", "--json", "--mongo-uri", mongodb_uri, "--database", db_name)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["live_relays"] == ["default"]
    assert report["warnings"] == []


def test_connection_failures_are_library_errors(closed_port):
    uri = f"mongodb://127.0.0.1:{closed_port}/?serverSelectionTimeoutMS=500"
    args = parse_args(["status", "--mongo-uri", uri, "--database", "d", "--connect-timeout", "1"])
    with pytest.raises(ConnectError, match=f"cannot connect to MongoDB at .*:{closed_port}"):
        _cli_commands.connect(args)
    args = parse_args(["init", "--mongo-uri", "notmongo://x", "--database", "d"])
    with pytest.raises(ConfigurationError, match="invalid MongoDB URI"):
        _cli_commands.connect(args)


# -- version, help, log flags ----------------------------------------------------------------


def test_version(capsys):
    from mongo_outbox import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"mongo-outbox {__version__}"
    result = _run("--version", script=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mongo-outbox {__version__}"


def _description(help_text: str) -> str:
    """The paragraph between a help text's usage lines and its argument lists."""
    body = help_text.split("\n\n", 1)[1]
    return body.split("\n\n", 1)[0].strip()


@pytest.mark.parametrize("command", sorted({*COMMANDS, "dead"}))
def test_every_command_has_a_description(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    description = _description(out)
    assert description, out
    assert not description.startswith(("positional arguments", "options")), out


@pytest.mark.parametrize("command", ["", *sorted(cli.cli.commands)])
def test_help_of_every_command_shows_the_variable_of_every_option(command, capsys):
    group = cli.cli
    code, out, _ = run_cli([command, "--help"] if command else ["--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())  # an option's help may wrap anywhere
    options = [
        p
        for p in (group.commands[command] if command else group).params
        if isinstance(p, click.Option) and p.expose_value  # not --version
    ]
    assert options
    for option in options:
        flag = option.opts[0]
        env = "MONGO_OUTBOX_" + flag.removeprefix("--").replace("-", "_").upper()
        assert f"[env var: {env}" in flat, (flag, out)


def test_checkpoint_promises_only_what_it_offers(capsys):
    _, top, _ = run_cli(["--help"], capsys)
    _, out, _ = run_cli(["checkpoint", "--help"], capsys)
    for text in (top, out):
        if "inspect" in text:
            assert "show" in text
    assert "[show|reset]" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "DEBUG", "--log-format", "json", "relay"],
        ["relay", "--log-level", "DEBUG", "--log-format", "json"],
        ["relay", "--log-level", "debug", "--log-format", "JSON"],
        [
            "--log-level",
            "ERROR",
            "--log-format",
            "text",
            "relay",
            "--log-level",
            "DEBUG",
            "--log-format",
            "json",
        ],
    ],
    ids=["before", "after", "lower-case", "after-wins"],
)
def test_log_flags_before_or_after_the_subcommand(argv):
    args = parse_args(argv)
    assert (args.log_level, args.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize(
    "command",
    [[c] for c in ("init", "status", "dead", "demo")] + [["checkpoint", "show"], ["requeue"]],
)
def test_log_flags_after_every_subcommand(command):
    args = parse_args([*command, "--log-level", "WARNING", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("WARNING", "json")


def test_log_settings_from_the_environment(monkeypatch):
    assert (parse_args(["status"]).log_level, parse_args(["status"]).log_format) == (
        "INFO",
        "text",
    )
    monkeypatch.setenv("MONGO_OUTBOX_LOG_LEVEL", "debug")
    monkeypatch.setenv("MONGO_OUTBOX_LOG_FORMAT", "json")
    args = parse_args(["status"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    args = parse_args(["status", "--log-format", "text"])
    assert args.log_format == "text"


def test_bad_log_format_exits_2(capsys):
    code, _, err = run_cli(["relay", "--log-format", "xml"], capsys)
    assert code == 2
    assert "xml" in _one_error_line(err)
    result = _run("init", env=_env(MONGO_OUTBOX_LOG_FORMAT="yaml"))
    assert result.returncode == 2
    assert "MONGO_OUTBOX_LOG_FORMAT" in _one_error_line(result.stderr)


def test_relay_accepts_log_level_after_the_subcommand_as_a_process(closed_port):
    uri = f"mongodb://127.0.0.1:{closed_port}/?serverSelectionTimeoutMS=500"
    result = _run(
        "relay",
        "--log-level",
        "DEBUG",
        "--project",
        "p",
        "--mongo-uri",
        uri,
        "--database",
        "d",
        "--connect-timeout",
        "1",
        script=True,
    )
    assert result.returncode == 3, result.stderr  # got past the flags, to connecting
    assert "unrecognized arguments" not in result.stderr


# -- status: failures, --check, datetimes, a missing outbox ----------------------------------


def _failing(client: MongoClient, database: str) -> list:
    """Three pending events that failed (two for one reason), one that never did."""
    docs = [build_document("OrderCreated", {"n": n}, key=f"order-{n}") for n in range(4)]
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    docs[0].update(attempts=2, last_error="topic orders does not exist", next_attempt_at=soon)
    docs[1].update(attempts=1, last_error="topic orders does not exist", next_attempt_at=soon)
    docs[2].update(attempts=0, last_error="refused earlier, requeued")
    client[database].outbox.insert_many(docs)
    return [d["_id"] for d in docs]


def test_status_shows_pending_events_that_failed(mongodb_uri, db_name, client, capsys):
    _failing(client, db_name)
    base = ["status", "--mongo-uri", mongodb_uri, "--database", db_name]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert re.search(r"^pending\s+4$", out, re.MULTILINE), out
    assert re.search(r"^failing\s+3$", out, re.MULTILINE), out
    assert "2 events, up to 2 attempts: topic orders does not exist" in out
    assert "1 event, up to 0 attempts: refused earlier, requeued" in out

    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["failing"] == 3
    reasons = {r["error"]: r for r in report["failing_reasons"]}
    assert reasons["topic orders does not exist"]["events"] == 2
    assert reasons["topic orders does not exist"]["max_attempts"] == 2
    assert reasons["refused earlier, requeued"]["events"] == 1


def test_status_lists_the_top_failing_reasons_and_counts_the_rest(
    mongodb_uri, db_name, client, capsys
):
    docs = [build_document("E", {"n": n}, key=f"k{n}") for n in range(12)]
    for n, doc in enumerate(docs):
        doc.update(attempts=1, last_error=f"reason {n}")
    client[db_name].outbox.insert_many(docs)
    base = ["status", "--mongo-uri", mongodb_uri, "--database", db_name]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert re.search(r"^failing\s+12$", out, re.MULTILINE), out
    assert len(re.findall(r"^  1 event, up to 1 attempts: reason", out, re.MULTILINE)) == 5
    assert "  and 7 more reasons (7 events)" in out
    code, out, err = run_cli([*base, "--json"], capsys)
    report = json.loads(out)
    assert len(report["failing_reasons"]) == 5
    assert report["failing_other_reasons"] == {"reasons": 7, "events": 7}


ISO_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def test_status_json_datetimes_are_iso_8601(mongodb_uri, db_name, client, capsys):
    state = client[db_name][state_collection_name("outbox")]
    assert Lease(state, "default", "host:1", ttl=60).try_acquire()
    OutboxStore(client[db_name]).save_token(
        "default", {"_data": "00"}, dt.datetime.now(dt.timezone.utc)
    )
    code, out, err = run_cli(
        ["status", "--json", "--mongo-uri", mongodb_uri, "--database", db_name], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert ISO_8601.match(report["lease_expires_at"]), report["lease_expires_at"]
    assert ISO_8601.match(report["checkpoint_at"]), report["checkpoint_at"]
    for relay in report["relays"]:
        assert ISO_8601.match(relay["lease_expires_at"]), relay
    # The same form as the message attribute outbox_created_at.
    assert report["lease_expires_at"].endswith("Z")


def test_status_check_passes_on_a_healthy_outbox(mongodb_uri, db_name, client, capsys):
    client[db_name].outbox.insert_one(build_document("E", b"x"))  # fresh and pending
    base = ["status", "--mongo-uri", mongodb_uri, "--database", db_name]
    code, out, err = run_cli([*base, "--check", "--max-lag", "300"], capsys)
    assert code == 0, err
    assert "check ok" in out
    code, out, err = run_cli([*base, "--check", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["check"] == {"ok": True, "failures": []}


def test_status_check_fails_on_dead_events(mongodb_uri, db_name, client, capsys):
    _seed(client, db_name)
    base = ["status", "--mongo-uri", mongodb_uri, "--database", db_name]
    code, _, err = run_cli(base, capsys)
    assert code == 0, err  # without --check the status is only shown
    code, out, _ = run_cli([*base, "--check"], capsys)
    assert code == _cli_commands.EXIT_CHECK == 4
    assert "check failed: 1 dead event" in out
    assert "mongo-outbox requeue" in out
    result = _run(*base, "--check", "--json")
    assert result.returncode == 4, result.stderr
    report = json.loads(result.stdout)
    assert report["check"]["ok"] is False
    assert any("dead" in f for f in report["check"]["failures"])


def test_status_check_fails_on_lag(mongodb_uri, db_name, client, capsys):
    doc = build_document("E", b"x")
    doc["created_at"] = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    client[db_name].outbox.insert_one(doc)
    base = ["status", "--mongo-uri", mongodb_uri, "--database", db_name]
    code, out, err = run_cli([*base, "--check"], capsys)
    assert code == 0, err  # no lag limit given: only dead events fail the check
    code, out, _ = run_cli([*base, "--check", "--max-lag", "60"], capsys)
    assert code == 4
    assert re.search(r"check failed: the oldest pending event is \d+s old \(limit 60s\)", out), out
    result = _run(*base, env=_env(MONGO_OUTBOX_CHECK="1", MONGO_OUTBOX_MAX_LAG="60"))
    assert result.returncode == 4, result.stdout + result.stderr


def test_status_max_lag_must_be_positive(capsys):
    code, _, err = run_cli(["status", "--check", "--max-lag", "-1"], capsys)
    assert code == 2
    assert "must be positive" in _one_error_line(err)


@pytest.mark.parametrize("where", ["database", "collection"])
def test_status_of_a_missing_outbox_says_so_and_creates_nothing(
    where, mongodb_uri, db_name, client, capsys
):
    database, collection = (f"{db_name}x", "outbox") if where == "database" else (db_name, "oops")
    argv = ["--mongo-uri", mongodb_uri, "--database", database, "--collection", collection]
    for command in (["status"], ["status", "--check"], ["dead"], ["checkpoint", "show"]):
        code, out, err = run_cli([*command, *argv], capsys)
        assert code == 2, (command, out, err)
        line = _one_error_line(err)
        assert f"no outbox collection {database}.{collection}" in line
        assert "--database/--collection" in line
        assert "mongo-outbox init" in line
    assert f"{db_name}x" not in client.list_database_names()
    assert "oops" not in client[db_name].list_collection_names()


# -- dead ------------------------------------------------------------------------------------


def test_dead_lists_dead_events_with_reasons(mongodb_uri, db_name, client, capsys):
    ids = _dead_docs(client, db_name)
    client[db_name].outbox.insert_one(build_document("Alive", b"x"))
    base = ["dead", "--mongo-uri", mongodb_uri, "--database", db_name]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert any(line.startswith("abc OrderCreated") and "refused abc" in line for line in lines)
    assert any(line.startswith("42 OrderCreated") and "key=order-1" in line for line in lines)
    assert any(line.startswith(str(ids[2])) for line in lines)

    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["total"] == 3
    by_id = {e["id"]: e for e in report["events"]}
    assert set(by_id) == {"abc", "42", str(ids[2])}
    assert by_id["abc"]["error"] == "refused abc"
    assert by_id["42"]["attempts"] == 10
    assert ISO_8601.match(by_id["42"]["created_at"])


def test_dead_filters_and_limit(mongodb_uri, db_name, client, capsys):
    ids = _dead_docs(client, db_name)
    base = ["dead", "--json", "--mongo-uri", mongodb_uri, "--database", db_name]

    def listed(*flags: str) -> list[str]:
        code, out, err = run_cli([*base, *flags], capsys)
        assert code == 0, err
        return sorted(e["id"] for e in json.loads(out)["events"])

    assert listed("--id", "42") == ["42"]
    assert listed("--id", str(ids[2]).upper(), "--id", "abc") == sorted(["abc", str(ids[2])])
    assert listed("--key", "order-0") == ["abc"]
    assert listed("--type", "Nope") == []
    assert listed("--older-than", "3600") == []
    assert len(listed("--limit", "2")) == 2
    code, out, err = run_cli([*base, "--limit", "2"], capsys)
    assert code == 0, err
    assert json.loads(out)["total"] == 3
    code, out, err = run_cli(["dead", "--limit", "2", *base[2:]], capsys)
    assert code == 0, err
    assert "showing 2 of 3" in out


def test_dead_of_an_outbox_with_none(mongodb_uri, db_name, capsys):
    code, out, err = run_cli(["dead", "--mongo-uri", mongodb_uri, "--database", db_name], capsys)
    assert code == 0, err
    assert out.strip() == "no dead events"


# -- checkpoint show ------------------------------------------------------------------------


def test_checkpoint_show(mongodb_uri, db_name, client, capsys):
    base = ["checkpoint", "show", "--mongo-uri", mongodb_uri, "--database", db_name]
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert "relay 'default' has no checkpoint" in out
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=90)
    # A resume token whose cluster time is 120 s old: 0x82, 4 bytes of seconds, 4 of increment.
    seconds = int(time.time()) - 120
    token = {"_data": "82" + seconds.to_bytes(4, "big").hex() + "00000001" + "2B0229296E04"}
    OutboxStore(client[db_name]).save_token("default", token, at)
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert re.search(r"^checkpoint at\s+\S+Z \(9\d\.\ds ago\)$", out, re.MULTILINE), out
    assert re.search(r"^token time\s+\S+Z \(1[12]\d\.\ds ago\)$", out, re.MULTILINE), out
    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["relay"] == "default"
    assert 85 < report["checkpoint_age_s"] < 200
    assert 115 < report["token_age_s"] < 250
    assert ISO_8601.match(report["checkpoint_at"])


# -- error messages that name the fix ---------------------------------------------------------


def test_missing_topic_error_names_the_fix_for_relay_and_replay_alike():
    from google.api_core import exceptions as gexc

    from mongo_outbox.publishers._pubsub import map_google_error

    error = map_google_error(gexc.NotFound("Topic not found"), "projects/p/topics/orders")
    assert "--create-topics" in str(error)
    # Shared by the relay and replay: advice for one of them only (requeue) is not its own.
    assert "requeue" not in str(error)


def test_library_on_a_standalone_server_names_the_fix(standalone_uri):
    import asyncio

    from pymongo import AsyncMongoClient

    from mongo_outbox import outbox_transaction, run_in_outbox_transaction

    def check(excinfo: pytest.ExceptionInfo[ConfigurationError]) -> None:
        message = str(excinfo.value)
        assert "standalone" in message
        assert "--replSet" in message
        assert "rs.initiate()" in message
        assert getattr(excinfo.value.__cause__, "code", None) == 20

    with contextlib.closing(MongoClient(standalone_uri, serverSelectionTimeoutMS=5000)) as c:
        with pytest.raises(ConfigurationError) as excinfo:
            with outbox_transaction(c, database="lib") as tx:
                tx.emit("E", b"x")
        check(excinfo)
        with pytest.raises(ConfigurationError) as excinfo:
            with outbox_transaction(c, database="lib") as tx:
                c.lib.orders.insert_one({"n": 1}, session=tx.session)
                tx.emit("E", b"x")
        check(excinfo)
        with pytest.raises(ConfigurationError) as excinfo:
            run_in_outbox_transaction(c, lambda tx: tx.emit("E", b"x"), database="lib")
        check(excinfo)
        assert "lib" not in c.list_database_names()

    async def run_async() -> None:
        ac: AsyncMongoClient = AsyncMongoClient(standalone_uri, serverSelectionTimeoutMS=5000)
        try:
            with pytest.raises(ConfigurationError) as excinfo:
                async with outbox_transaction(ac, database="lib") as tx:
                    await ac.lib.orders.insert_one({"n": 1}, session=tx.session)
            check(excinfo)

            async def fn(tx):
                return tx.emit("E", b"x")

            with pytest.raises(ConfigurationError) as excinfo:
                await run_in_outbox_transaction(ac, fn, database="lib")
            check(excinfo)
        finally:
            await ac.close()

    asyncio.run(run_async())


def test_requeue_filters_come_from_the_environment(
    mongodb_uri, outbox_database, mongo_client, capsys, monkeypatch
):
    _dead_docs(mongo_client, outbox_database)
    outbox = mongo_client[outbox_database].outbox
    base = ["requeue", "--mongo-uri", mongodb_uri, "--database", outbox_database]
    monkeypatch.setenv("MONGO_OUTBOX_ID", "abc, 42")
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert out.strip() == "requeued 2 dead events"
    monkeypatch.delenv("MONGO_OUTBOX_ID")
    monkeypatch.setenv("MONGO_OUTBOX_ALL", "1")
    code, out, err = run_cli(base, capsys)
    assert code == 0, err
    assert out.strip() == "requeued 1 dead event"
    assert outbox.count_documents({"status": "dead"}) == 0


def test_status_shows_the_retention_of_a_named_inbox(
    mongodb_uri, outbox_database, mongo_client, capsys
):
    base = ["--mongo-uri", mongodb_uri, "--database", outbox_database]
    mongo_client[outbox_database].create_collection("billing_inbox")
    flags = [*base, "--inbox-collection", "billing_inbox"]
    assert run_cli(["init", *flags, "--retention", "2d"], capsys)[0] == 0
    code, out, _ = run_cli(["status", *flags], capsys)
    assert code == 0
    assert re.search(r"^retention\s+outbox 2d, billing_inbox 2d$", out, re.MULTILINE), out
    code, out, _ = run_cli(["status", *flags, "--json"], capsys)
    assert json.loads(out)["retention_s"] == {"outbox": 172800, "billing_inbox": 172800}


# -- asyncapi ----------------------------------------------------------------------------------


def test_asyncapi_writes_yaml_to_standard_output(capsys):
    import typed_events
    import yaml

    from mongo_outbox.typed import asyncapi

    code, out, _ = run_cli(["asyncapi", "typed_events"], capsys)
    assert code == 0
    assert yaml.safe_load(out) == asyncapi(typed_events)


def test_asyncapi_writes_json_for_a_json_output(tmp_path, capsys):
    import typed_events

    from mongo_outbox.typed import asyncapi

    target = tmp_path / "events.json"
    argv = ["asyncapi", "typed_events", "--message-format", "cloudevents", "--output", str(target)]
    code, out, _ = run_cli([*argv, "--title", "Shop"], capsys)
    assert (code, out) == (0, "")
    document = json.loads(target.read_text())
    assert document == asyncapi(typed_events, message_format="cloudevents", title="Shop")
    assert "ce-type" in document["components"]["messages"]["Ping"]["headers"]["properties"]


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("no_such_module_here", r"cannot import module 'no_such_module_here': ModuleNotFoundError"),
        ("helpers", r"module 'helpers' declares no events"),
    ],
)
def test_asyncapi_with_a_bad_module_exits_2(module, message, capsys):
    code, out, err = run_cli(["asyncapi", module], capsys)
    assert code == 2
    assert out == ""
    assert re.search(message, err), err


def test_asyncapi_as_the_console_script_imports_from_the_current_directory(tmp_path):
    (tmp_path / "shop_events.py").write_text(
        "from pydantic import BaseModel\n"
        "from mongo_outbox.typed import event\n\n"
        "@event('Paid', topic='payments', key='order_id')\n"
        "class Paid(BaseModel):\n"
        "    order_id: str\n"
    )
    env = _env()
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mongo-outbox"), "asyncapi", "shop_events"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "address: payments" in result.stdout


# -- signal handlers belong to the process ---------------------------------------------------


@pytest.mark.parametrize("once", [True, False], ids=["once", "stopped"])
def test_in_process_relay_leaves_the_callers_signal_handlers(
    once, mongodb_uri, db_name, pubsub, capsys
):
    caught: list[int] = []

    def callers(signum: int, frame: object) -> None:
        caught.append(signum)

    argv = ["relay", "--mongo-uri", mongodb_uri, "--database", db_name]
    argv += ["--project", pubsub.project, "--default-topic", pubsub.topic()[0]]
    before = {s: signal.signal(s, callers) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if once:
            code, _, _ = run_cli([*argv, "--once"], capsys)
        else:
            # The relay's own handler is in place while it runs: its SIGINT stops it.
            def interrupt() -> None:
                wait_for(lambda: signal.getsignal(signal.SIGINT) is not callers)
                os.kill(os.getpid(), signal.SIGINT)

            threading.Thread(target=interrupt, daemon=True).start()
            code, _, _ = run_cli(argv, capsys)
        assert code == 0
        assert signal.getsignal(signal.SIGINT) is callers
        assert signal.getsignal(signal.SIGTERM) is callers
        assert caught == []
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: caught == [signal.SIGINT])
    finally:
        for signum, old in before.items():
            signal.signal(signum, old)


def test_a_second_signal_reaches_the_callers_handler_in_process(
    mongodb_uri, db_name, pubsub, capsys, caplog
):
    caught: list[int] = []

    def callers(signum: int, frame: object) -> None:
        caught.append(signum)

    argv = ["relay", "--mongo-uri", mongodb_uri, "--database", db_name]
    argv += ["--project", pubsub.project, "--default-topic", pubsub.topic()[0]]
    before = signal.signal(signal.SIGTERM, callers)

    def interrupt_twice() -> None:
        wait_for(lambda: signal.getsignal(signal.SIGTERM) is not callers)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in caplog.text)  # else the two may merge into one
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        threading.Thread(target=interrupt_twice, daemon=True).start()
        code, _, _ = run_cli(argv, capsys)  # not os._exit: this process is the caller's
        assert code == 0
        wait_for(lambda: caught == [signal.SIGTERM])
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)
