"""No password is ever printed, whatever characters it holds, escaped or as pasted.

Hypothesis generates passwords from printable, reserved and non-ASCII characters; each is put
in a URI unescaped and escaped, and every output is checked: the redaction functions, log lines
of every level in both formats, and the CLI's output in both formats with MongoDB accepting the
password, refusing it and down.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import socket
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from bson import ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient

from mongo_outbox import _logging
from mongo_outbox._redact import Redactor, redact, redact_uri, uri_secrets
from mongo_outbox.cli import main

RESERVED = ":/?#[]@!$&'()*+,;=% "
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " éß€✓"
# A piece of a password at least this long, left whole between delimiters, must not print
# either (a shorter one is too common a string to tell a leak from a coincidence).
LEAK_PIECE = 6

_parts = st.lists(
    st.one_of(st.text(ALPHABET, min_size=1, max_size=8), st.sampled_from(RESERVED)), max_size=4
).map("".join)
# Around a random piece long enough that finding it in an output can only mean a leak.
passwords = st.tuples(
    _parts,
    # Letters and digits both: a word alone ("logger") can be a field name of the format.
    st.text(string.ascii_letters + string.digits, min_size=LEAK_PIECE, max_size=10).filter(
        lambda s: not s.isalpha() and not s.isdigit()
    ),
    _parts,
).map("".join)


def _forms(password: str, escaped: bool) -> list[str]:
    """The password and its escaped forms; when written unescaped, also its long pieces between
    URI delimiters, where a parser that cuts at the wrong place would leak it in parts."""
    forms = [password, quote_plus(password), quote(password, safe="")]
    if not escaped:
        pieces = re.split(r"[/?#@:\[\],;&=\s%+]+", password)
        forms += [p for p in pieces if len(p) >= LEAK_PIECE]
    return forms


def _assert_hidden(password: str, *outputs: str, escaped: bool = False) -> None:
    for output in outputs:
        for form in _forms(password, escaped):
            assert form not in output, (form, output)


def _uris(password: str, host: str) -> list[tuple[str, bool]]:
    """The password in a URI as pasted and escaped, each with whether it is escaped."""
    return [
        (f"mongodb://outbox_user:{password}@{host}/?replicaSet=rs0", False),
        (f"mongodb://outbox_user:{quote_plus(password)}@{host}/shop?authSource=admin", True),
    ]


# -- the functions -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Unknown option")
@settings(max_examples=400, deadline=None)
@given(password=passwords)
def test_redaction_functions_hide_every_password(password):
    for uri, escaped in _uris(password, "db1:27017,db2:27017"):
        scrub = Redactor.for_uris(uri)
        outputs = [redact_uri(uri), scrub(f"connecting to {uri} now"), scrub(repr(uri))]
        try:
            MongoClient(uri, connect=False, serverSelectionTimeoutMS=1).close()
        except Exception as exc:  # the driver's own words about a URI it cannot parse
            outputs.append(scrub(str(exc)))
        if not re.search(r"[\s'\"]", password):  # a URI in free text, password unknown
            outputs.append(redact(f"connecting to {uri} now"))
        _assert_hidden(password, *outputs, escaped=escaped)


def test_redact_uri_keeps_hosts_and_database_drops_options():
    uri = "mongodb://u:Zq9+Kx/XYZZYa1b2=@h1:1,h2:2/shop?tlsCertificateKeyFilePassword=k1k2k3"
    assert redact_uri(uri) == "mongodb://***@h1:1,h2:2/shop"
    assert "k1k2k3" in uri_secrets(uri)
    assert redact_uri("mongodb+srv://h/shop?x=1") == "mongodb+srv://h/shop"


@settings(max_examples=150, deadline=None)
@given(password=passwords, level=st.sampled_from([10, 20, 30, 40, 50]))
def test_log_lines_hide_every_password_at_every_level(password, level):
    uri, _ = _uris(password, "db1:27017")[0]
    for log_format in _logging.LOG_FORMATS:
        stream = io.StringIO()
        with _logging.cli_logging("DEBUG", log_format, secrets=uri_secrets(uri), stream=stream):
            log = logging.getLogger("mongo_outbox.test_redaction")
            log.log(level, "using %s", uri, extra={"detail": uri})
            try:
                raise ValueError(f"bad {uri}")
            except ValueError:
                log.log(level, "failed", exc_info=True)
        _assert_hidden(password, stream.getvalue())


# -- the command, with MongoDB accepting, refusing and down ------------------------------------


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def user_admin(mongodb_uri) -> Iterator[Any]:
    """Sets the password of a user on the session's replica set (the server does not enforce
    auth, but a client that gives credentials authenticates with them)."""
    user = "outbox_user"
    with MongoClient(mongodb_uri) as admin:
        admin.admin.command("createUser", user, pwd="initial", roles=["root"])
        try:
            yield lambda pwd: admin.admin.command("updateUser", user, pwd=pwd)
        finally:
            admin.admin.command("dropUser", user)


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue() + err.getvalue()


@pytest.mark.slow
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(password=passwords)
def test_commands_print_no_password(password, mongodb_uri, user_admin, closed_port):
    host = mongodb_uri.split("://", 1)[1].split("/", 1)[0]
    user_admin(password)
    codes = set()
    for state, where in [("up", host), ("refusing", host), ("down", f"127.0.0.1:{closed_port}")]:
        given = password if state != "refusing" else password + "x"
        for uri, escaped in _uris(given, where):
            for log_format in _logging.LOG_FORMATS:
                command = ["status"] if state != "down" else ["relay", "--project", "p"]
                code, output = _run(
                    [
                        "--log-level",
                        "DEBUG",
                        "--log-format",
                        log_format,
                        *command,
                        "--mongo-uri",
                        uri,
                        "--database",
                        f"redact_{ObjectId()}",
                        "--connect-timeout",
                        "0.5",
                    ]
                )
                codes.add((state, code))
                _assert_hidden(given, output, escaped=escaped)
    # Each state was reached: an accepted password gets past authentication (no outbox: 2).
    assert {state for state, _code in codes} == {"up", "refusing", "down"}
    assert ("down", 0) not in codes


@pytest.mark.parametrize(
    ("password", "leaked"),
    [("Zq9+Kx/XYZZYa1b2=", "XYZZYa1b2"), ("hunter2#tail", "hunter2"), ("hunter2?tail", "hunter2")],
)
@pytest.mark.parametrize("log_format", _logging.LOG_FORMATS)
def test_pasted_passwords_are_not_printed_during_an_outage(
    password, leaked, log_format, closed_port
):
    uri = f"mongodb://user:{password}@127.0.0.1:{closed_port}/"
    argv = ["--log-format", log_format, "relay", "--project", "p", "--mongo-uri", uri]
    code, output = _run([*argv, "--database", "d", "--connect-timeout", "0.5"])
    assert code in (2, 3), output
    assert leaked not in output
    assert "mongodb://***@" in output or "percent-encoded" in output
