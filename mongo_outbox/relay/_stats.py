"""Counters of a relay."""

from __future__ import annotations

from dataclasses import dataclass

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
