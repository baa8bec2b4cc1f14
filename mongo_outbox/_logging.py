"""Logging for the ``mongo-outbox`` command: text or JSON lines, credentials always redacted.

Library code attaches an event id to a record with ``extra={"event_id": ...}`` (and its trace
context with ``extra={"traceparent": ...}``); the JSON format, Cloud Logging's structured lines
(:mod:`mongo_outbox._cloudlog`), prints each extra as a field of its own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO

from ._cloudlog import CloudLoggingFormatter as JsonFormatter
from ._redact import Redactor, redact

__all__ = ["LOG_FORMATS", "JsonFormatter", "RedactingFilter", "cli_logging", "redact"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class RedactingFilter(logging.Filter):
    """Scrubs URI credentials (and known ``secrets``) from a record's message, arguments,
    exception text and string extras. Install it on a handler so it sees every record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._scrub = Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad log call: keep its parts, never raise into the caller
            message = f"{record.msg} {record.args!r}"
        record.msg = self._scrub(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._scrub(record.stack_info)
        for name, value in list(record.__dict__.items()):
            if name not in _STANDARD and isinstance(value, str):
                setattr(record, name, self._scrub(value))
        return True


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


@contextmanager
def cli_logging(
    level: str,
    log_format: str = "text",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    project: str | None = None,
) -> Iterator[None]:
    """Log to stderr (or ``stream``) at ``level`` in ``log_format`` with credentials redacted;
    the root logger's handlers and level are restored on leaving. ``project`` (the Google Cloud
    project) completes the JSON lines' trace field."""
    handler: logging.Handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter(project) if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        handler.close()
