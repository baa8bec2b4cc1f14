"""Credentials out of everything printed: MongoDB URIs, driver errors, log lines.

A password is found the way PyMongo finds it: the user info is everything between the scheme and
the *last* ``@``, whatever characters it holds. ``urllib.parse`` stops the authority at the first
``/``, ``?`` or ``#``, which unescaped passwords (base64 ones hold ``/``) contain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus

__all__ = ["Redactor", "redact", "redact_uri", "unescaped_hint", "uri_secrets"]

_SCHEME = re.compile(r"mongodb(?:\+srv)?://", re.IGNORECASE)
# In free text a URI's end is unknown: everything up to the last "@" before white space or a
# quote is taken for user info. A known password (``uri_secrets``) is scrubbed wherever it is.
_URI_CREDENTIALS = re.compile(r"(mongodb(?:\+srv)?://)[^\s'\"]*@", re.IGNORECASE)
# Where PyMongo and urllib cut a URI: a password holding one of these leaks in pieces.
_DELIMITERS = re.compile(r"[/?#@:\[\],;&=\s]+")
# Options whose values are credentials (a key file's password, AWS session tokens).
_SECRET_OPTIONS = frozenset({"tlscertificatekeyfilepassword", "authmechanismproperties"})
_SHORTEST_PIECE = 3  # shorter pieces of a password are too common to scrub from every line


def _split(uri: str) -> tuple[str, str | None, str] | None:
    """(scheme, user info or None, hosts and the rest) of a MongoDB URI, or None."""
    match = _SCHEME.match(uri.strip())
    if match is None:
        return None
    rest = uri.strip()[match.end() :]
    userinfo, at, hosts = rest.rpartition("@")
    return (match.group(0), userinfo, hosts) if at else (match.group(0), None, rest)


def redact_uri(uri: str) -> str:
    """``uri`` without its user info and options, safe to print: ``mongodb://***@host/db``."""
    parts = _split(uri)
    if parts is None:
        return _URI_CREDENTIALS.sub(r"\1***@", uri) if "://" in uri else "<URI>"
    scheme, userinfo, rest = parts
    where = re.split(r"[?#]", rest, maxsplit=1)[0]
    return f"{scheme}{'***@' if userinfo is not None else ''}{where}"


def uri_secrets(uri: str | None) -> list[str]:
    """Every form of every credential in ``uri``: the password as written, decoded both ways
    PyMongo and urllib decode it, its pieces between URI delimiters when it holds any, and the
    values of credential options."""
    parts = _split(uri or "")
    if parts is None:
        return []
    _scheme, userinfo, rest = parts
    found: list[str] = []
    if userinfo and ":" in userinfo:
        password = userinfo.partition(":")[2]
        found += [password, unquote(password), unquote_plus(password)]
        if _DELIMITERS.search(password):
            pieces = _DELIMITERS.split(password)
            found += [userinfo, *(p for p in pieces if len(p) >= _SHORTEST_PIECE)]
    for option in re.split(r"[&;]", rest.partition("?")[2]):
        name, _, value = option.partition("=")
        if name.lower() in _SECRET_OPTIONS and value:
            found += [value, unquote_plus(value)]
    return sorted({s for s in found if s}, key=len, reverse=True)


def unescaped_hint(uri: str) -> str:
    """A sentence for an invalid URI whose user info holds characters that must be escaped."""
    parts = _split(uri)
    userinfo = parts[1] if parts else None
    if userinfo and (re.search(r"[/?#@\[\]\s]", userinfo) or userinfo.count(":") > 1):
        return (
            "; the user name or password holds characters that must be percent-encoded "
            "(escape each with urllib.parse.quote_plus)"
        )
    return ""


class Redactor:
    """Scrubs URI credentials and known secrets from text; callable."""

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # As written and as repr() and JSON escape it (a URI inside a quoted structure),
        # longest first, so a secret that contains another is replaced whole.
        forms = {f for s in secrets if s for f in (s, repr(s)[1:-1], json.dumps(s)[1:-1])}
        self._secrets = tuple(sorted(forms, key=len, reverse=True))

    @classmethod
    def for_uris(cls, *uris: str | None) -> Redactor:
        """A redactor of every credential the given URIs hold."""
        return cls(s for uri in uris for s in uri_secrets(uri))

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _URI_CREDENTIALS.sub(r"\1***@", text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the credentials of every MongoDB URI and every given secret replaced."""
    return Redactor(secrets)(text)
