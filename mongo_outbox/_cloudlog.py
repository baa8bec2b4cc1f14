"""JSON log lines as Google Cloud Logging reads them (python-json-logger does the JSON).

One object per line: ``severity``, ``message``, ``time`` (RFC 3339, UTC),
``logging.googleapis.com/sourceLocation``, ``logger``, the record's extras as fields of their
own, ``stack_trace`` for an exception (what Error Reporting reads) and, where the record
carries an event's W3C trace context (``extra={"traceparent": ...}``),
``logging.googleapis.com/trace`` (``projects/<project>/traces/<trace id>``, when the project is
known), ``logging.googleapis.com/spanId`` and ``logging.googleapis.com/trace_sampled``.

PyMongo's structured log messages (a JSON object as the message) become fields too: their
``message`` is the line's message.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _LibraryJsonFormatter

__all__ = ["TRACEPARENT", "CloudLoggingFormatter"]

#: The ``extra=`` name of an event's W3C ``traceparent`` on a log record.
TRACEPARENT = "traceparent"

_TRACE_FIELD = "logging.googleapis.com/trace"
_SPAN_FIELD = "logging.googleapis.com/spanId"
_SAMPLED_FIELD = "logging.googleapis.com/trace_sampled"
_SOURCE_FIELD = "logging.googleapis.com/sourceLocation"
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_OWN = ("severity", "message", "time", "logger", _SOURCE_FIELD, "stack_trace")


class CloudLoggingFormatter(_LibraryJsonFormatter):
    """Formats records as Cloud Logging's structured JSON lines; ``project`` names the Google
    Cloud project of the trace field (without it, the trace id alone is not linked)."""

    def __init__(self, project: str | None = None) -> None:
        super().__init__(
            rename_fields={"exc_info": "stack_trace"},
            json_ensure_ascii=True,  # no character in the line can be taken for a line break
        )
        self.project = project

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        if record.exc_info and record.exc_text:
            # Already formatted, and scrubbed of credentials by the redacting filter: print
            # that text, not a fresh rendering of the exception.
            exc_info, record.exc_info = record.exc_info, None
            try:
                return super().format(record)
            finally:
                record.exc_info = exc_info
        return super().format(record)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """The Cloud Logging fields first, then the library's (extras, ``stack_trace``)."""
        when = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        log_data["severity"] = record.levelname
        log_data["message"] = record.message
        log_data["time"] = when.isoformat(timespec="microseconds").replace("+00:00", "Z")
        log_data["logger"] = record.name
        log_data[_SOURCE_FIELD] = {
            "file": record.pathname,
            "line": str(record.lineno),  # Cloud Logging's LogEntrySourceLocation: int64 as string
            "function": record.funcName,
        }
        super().add_fields(log_data, record, message_dict)
        traceparent = log_data.pop(TRACEPARENT, None)
        if isinstance(traceparent, str):
            self._add_trace(log_data, traceparent)
        if record.name.startswith("pymongo"):
            _unfold_pymongo(log_data)
        if "event_id" in log_data:
            log_data["event_id"] = str(log_data["event_id"])

    def _add_trace(self, log_data: dict[str, Any], traceparent: str) -> None:
        match = _TRACEPARENT_RE.match(traceparent.strip())
        if match is None:
            return
        trace, span, flags = match.groups()
        if self.project:
            log_data[_TRACE_FIELD] = f"projects/{self.project}/traces/{trace}"
        else:
            log_data["trace_id"] = trace
        log_data[_SPAN_FIELD] = span
        log_data[_SAMPLED_FIELD] = bool(int(flags, 16) & 1)


def _unfold_pymongo(log_data: dict[str, Any]) -> None:
    """PyMongo logs a JSON object as its message: its fields become the line's."""
    text = log_data.get("message")
    if not isinstance(text, str) or not text.startswith("{"):
        return
    try:
        fields = json.loads(text)
    except ValueError:
        return
    if not isinstance(fields, dict):
        return
    log_data["message"] = str(fields.pop("message", ""))
    for key, value in fields.items():
        log_data[f"pymongo.{key}" if key in _OWN or key in log_data else key] = value
