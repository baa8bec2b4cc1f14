"""The relay's one backoff policy: exponential with jitter, capped."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays that double from ``initial`` up to ``maximum`` seconds, each jittered to 50-100%.

    Used for in-place retries of transient publish errors, restarts of the pipeline, the next
    attempt of an event that failed permanently, and the isolation of a failing topic.
    """

    initial: float
    maximum: float

    def delay(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (1-based)."""
        # The exponent is capped so a huge attempt count cannot overflow the float.
        base = min(self.maximum, self.initial * 2.0 ** min(max(0, attempt - 1), 64))
        return base * random.uniform(0.5, 1.0)
