"""How much change-stream history the server keeps, and where a resume token sits in it.

A resume token is usable while the oplog still holds its cluster time. The *window* is the
time between the oldest and newest oplog entries; the *headroom* of a checkpoint is its
cluster time minus the oldest entry's: at 0 the token is lost and the relay must recover by a
full sweep. Reading the oplog needs a replica set member (not mongos) and read access to the
``local`` database; where that is missing the answer says why instead of failing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bson import Timestamp
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from ._mongo_errors import is_auth_failure

__all__ = ["OplogWindow", "headroom", "read_oplog_window", "token_time"]


@dataclass(frozen=True, slots=True)
class OplogWindow:
    """The oldest and newest oplog entry times, or why they cannot be read."""

    first: Timestamp | None = None
    last: Timestamp | None = None
    unavailable: str | None = None

    @property
    def seconds(self) -> float | None:
        """Newest minus oldest entry time (None when unknown)."""
        if self.first is None or self.last is None:
            return None
        return float(self.last.time - self.first.time)


def read_oplog_window(client: MongoClient[Any]) -> OplogWindow:
    """Read the first and last oplog entry times of the member ``client`` talks to."""
    try:
        oplog = client.local["oplog.rs"]
        first = oplog.find_one({}, {"ts": 1}, sort=[("$natural", 1)])
        last = oplog.find_one({}, {"ts": 1}, sort=[("$natural", -1)])
    except OperationFailure as exc:
        if is_auth_failure(exc):
            return OplogWindow(unavailable="no privilege to read local.oplog.rs")
        return OplogWindow(unavailable=f"local.oplog.rs cannot be read here: {exc.code}")
    except PyMongoError as exc:
        return OplogWindow(unavailable=f"local.oplog.rs cannot be read: {type(exc).__name__}")
    if first is None or last is None:
        # mongos has no local.oplog.rs of its own: the query finds nothing.
        return OplogWindow(unavailable="no oplog here (a mongos, or not a replica set member)")
    ts_first, ts_last = first.get("ts"), last.get("ts")
    if not isinstance(ts_first, Timestamp) or not isinstance(ts_last, Timestamp):
        return OplogWindow(unavailable="oplog entries without a timestamp")
    return OplogWindow(ts_first, ts_last)


def token_time(token: Mapping[str, Any] | None) -> Timestamp | None:
    """The cluster time a change stream resume token points at (None if it cannot be told).

    Tokens hold a hex ``_data`` string whose first byte, 0x82, tags the cluster time that
    follows as 4 bytes of seconds and 4 of increment.
    """
    data = token.get("_data") if token is not None else None
    if not isinstance(data, str) or len(data) < 18:
        return None
    try:
        raw = bytes.fromhex(data[:18])
    except ValueError:
        return None
    if raw[0] != 0x82:
        return None
    return Timestamp(int.from_bytes(raw[1:5], "big"), int.from_bytes(raw[5:9], "big"))


def headroom(token: Mapping[str, Any] | None, window: OplogWindow) -> float | None:
    """Seconds between the token's cluster time and the oldest oplog entry (None if unknown)."""
    at = token_time(token)
    if at is None or window.first is None:
        return None
    return float(at.time - window.first.time)
