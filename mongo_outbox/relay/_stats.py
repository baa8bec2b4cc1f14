"""Counters of a relay."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

__all__ = ["RelayStats"]


@dataclass
class RelayStats:
    """Counters since the relay started."""

    published: int = 0
    failed: int = 0
    dead: int = 0
    skipped_duplicates: int = 0
    recoveries: int = 0
    restarts: int = 0
    sweep_resumes: int = 0

    @classmethod
    def total(cls, parts: Iterable[RelayStats]) -> RelayStats:
        """The sum of several relays' counters."""
        result = cls()
        for part in parts:
            for f in fields(cls):
                setattr(result, f.name, getattr(result, f.name) + getattr(part, f.name))
        return result
