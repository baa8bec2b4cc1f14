"""Retention: TTL indexes that delete published events and old inbox records by themselves."""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from ._document import STATUS_PUBLISHED
from ._errors import ConfigurationError

__all__ = [
    "INBOX_TTL_INDEX",
    "OUTBOX_TTL_INDEX",
    "parse_duration",
    "retention_of",
    "set_retention",
]

#: The outbox's TTL index: published events only (pending and dead ones never expire).
OUTBOX_TTL_INDEX = "published_at_ttl"
#: The inbox's TTL index on ``processed_at``.
INBOX_TTL_INDEX = "processed_at_ttl"
_TTL = {
    "published_at": (OUTBOX_TTL_INDEX, {"status": STATUS_PUBLISHED}),
    "processed_at": (INBOX_TTL_INDEX, None),
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or ``1d12h``."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit (s, m, h, d, w), e.g. 7d or 36h"
        )
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _seconds(retention: _dt.timedelta | float) -> int:
    seconds = retention.total_seconds() if isinstance(retention, _dt.timedelta) else retention
    if not seconds >= 1:  # also refuses NaN
        raise ConfigurationError(f"retention must be at least one second, got {retention!r}")
    return int(seconds)


def set_retention(
    collection: Collection[Any], field: str, retention: _dt.timedelta | float | None
) -> None:
    """Keep (create, or change) the TTL index on ``field`` at ``retention``; None removes it.

    ``field`` is ``published_at`` (an outbox: published events only) or ``processed_at`` (an
    inbox). MongoDB's TTL monitor deletes expired documents about once a minute.
    """
    name, partial = _TTL[field]
    indexes = collection.index_information()
    existing = indexes.get(name)
    if retention is None:
        if existing is not None:
            collection.drop_index(name)
        return
    seconds = _seconds(retention)
    others = [
        other
        for other, index in indexes.items()
        if other != name
        and "expireAfterSeconds" in index
        and index.get("key", [])[:1] == [(field, ASCENDING)]
    ]
    if others:
        # MongoDB allows it beside ours (the filters differ), and it expires on its own terms.
        raise ConfigurationError(
            f"{collection.full_name} has a TTL index on {field} that this library does not "
            f"keep ({', '.join(others)}): drop it (or keep it and leave the retention unset)"
        )
    if existing is not None and (
        existing.get("key") != [(field, ASCENDING)]
        or existing.get("partialFilterExpression") != partial
    ):
        # Changing its expiry could delete what it should not (pending or dead events).
        raise ConfigurationError(
            f"{collection.full_name} has an index named {name} that is not the one this "
            f"library keeps (key {existing.get('key')}, filter "
            f"{existing.get('partialFilterExpression')}): drop it, then set the retention again"
        )
    if existing is not None:
        if existing.get("expireAfterSeconds") != seconds:
            collection.database.command(
                {"collMod": collection.name, "index": {"name": name, "expireAfterSeconds": seconds}}
            )
        return
    options: dict[str, Any] = {"name": name, "expireAfterSeconds": seconds}
    if partial is not None:
        options["partialFilterExpression"] = partial
    try:
        collection.create_index([(field, ASCENDING)], **options)
    except OperationFailure as exc:
        if exc.code in (85, 86):  # IndexOptionsConflict, IndexKeySpecsConflict
            raise ConfigurationError(
                f"{collection.full_name} already has another index on {field} ({exc}): drop it, "
                f"then set the retention again"
            ) from exc
        raise


def retention_of(collection: Collection[Any], field: str) -> float | None:
    """Seconds of the TTL index on ``field`` kept by :func:`set_retention` (None: none)."""
    name, _ = _TTL[field]
    index = collection.index_information().get(name)
    value = None if index is None else index.get("expireAfterSeconds")
    return None if value is None else float(value)
