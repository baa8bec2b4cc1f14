"""Times as the outbox stores and publishes them: UTC, milliseconds, ISO 8601."""

from __future__ import annotations

import calendar
import datetime as _dt
from typing import Any

__all__ = ["age_of", "as_utc", "format_timestamp", "utc_second", "utcnow"]


def format_timestamp(value: _dt.datetime) -> str:
    """ISO 8601 in UTC with millisecond precision, e.g. ``2026-11-27T06:37:30.123Z``.

    Naive datetimes are taken as UTC (PyMongo returns naive UTC by default).
    """
    offset = value.utcoffset()
    if offset:
        value = value - offset
    # Formatting the naive value skips a timezone conversion on the relay's hot path.
    return value.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def utcnow() -> _dt.datetime:
    """Now in UTC, truncated to the millisecond that BSON datetimes keep."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: _dt.datetime) -> _dt.datetime:
    """An aware UTC datetime (PyMongo hands out naive UTC unless ``tz_aware``)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=_dt.timezone.utc)
    return value


def age_of(value: Any) -> float | None:
    """Seconds since ``value`` (None when it is not a datetime)."""
    if not isinstance(value, _dt.datetime):
        return None
    age: float = (_dt.datetime.now(_dt.timezone.utc) - as_utc(value)).total_seconds()
    return age


# The relay formats the created_at of every event it reads, and most events of a batch share a
# second: whole UTC seconds, by (year, month, day, hour, minute, second), with their ISO 8601
# text and their seconds since the epoch. Bounded; a race between threads only recomputes.
_UTC_SECONDS: dict[tuple[int, int, int, int, int, int], tuple[str, int]] = {}


def utc_second(value: _dt.datetime) -> tuple[str, int]:
    """The whole second of ``value`` (naive UTC, or aware in UTC): its ISO 8601 text (to the
    seconds, no zone) and its seconds since the epoch."""
    key = (value.year, value.month, value.day, value.hour, value.minute, value.second)
    known = _UTC_SECONDS.get(key)
    if known is None:
        second = value.replace(microsecond=0, tzinfo=None)
        known = (second.isoformat(), calendar.timegm(second.timetuple()))
        if len(_UTC_SECONDS) >= 4096:
            _UTC_SECONDS.clear()
        _UTC_SECONDS[key] = known
    return known
