"""The relay's position in the change stream and when it is saved."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .._errors import LeaseLostError
from .._store import OutboxStore
from .._times import utcnow
from ._lease import Lease

__all__ = ["Checkpoint"]


class Checkpoint:
    """The resume token of relay ``name``: loaded once per lease, saved fenced by the lease.

    Saves happen at most every ``interval`` seconds unless forced (shutdown, recovery).
    """

    def __init__(self, store: OutboxStore, name: str, lease: Lease, interval: float) -> None:
        self._store = store
        self._name = name
        self._lease = lease
        self._interval = interval
        self.token: Mapping[str, Any] | None = None
        self._loaded = False
        self._saved: Mapping[str, Any] | None = None
        self._saved_at = 0.0
        #: Wall-clock time of this relay's last save (None before its first).
        self.saved_at: float | None = None

    def load(self) -> Mapping[str, Any] | None:
        """The saved token (read from MongoDB the first time after :meth:`invalidate`)."""
        if not self._loaded:
            self.token = self._store.load_token(self._name)
            self._saved = self.token
            self._loaded = True
        return self.token

    def invalidate(self) -> None:
        """Read the token again before the next use (another relay may have moved it)."""
        self._loaded = False

    def forget(self) -> None:
        """Drop an unusable token: the next start recovers by a full sweep."""
        self.token = None

    def advance(self, token: Mapping[str, Any] | None) -> None:
        """The stream has reached ``token``; everything before it is handled."""
        if token is not None:
            self.token = token

    def save(self, *, force: bool = False) -> None:
        """Persist the token if it moved; raise :class:`LeaseLostError` if the fence refuses."""
        token = self.token
        if token is None or token == self._saved:
            return
        now = time.monotonic()
        if not force and now - self._saved_at < self._interval:
            return
        self._lease.check()
        if not self._store.save_token(self._name, token, utcnow(), self._lease.fenced()):
            raise LeaseLostError(f"relay {self._name!r} lost its lease (checkpoint refused)")
        self._saved = token
        self._saved_at = now
        self.saved_at = time.time()
