"""The package's one retry policy: delays that double up to a cap, jittered; a stop event cuts a
wait short.

Built on tenacity. The relay's in-place retries of transient publish errors, its pipeline
restarts, the next attempt of an event that failed permanently and the isolation of a failing
topic take :meth:`Backoff.delay`; a call retried as a whole (replay's publish, the commit
retry) takes :meth:`Backoff.retrying`.
"""

from __future__ import annotations

import random
import threading

import tenacity
from tenacity.wait import wait_base

__all__ = ["GIVE_UP_AFTER", "Backoff"]

#: How long a call that keeps failing transiently is retried before its error is raised
#: (PyMongo's ``with_transaction`` gives up after as long).
GIVE_UP_AFTER = 120.0


class _Jittered(wait_base):
    """The delay of ``wait`` times a random factor from 0.5 to 1 (retriers spread out)."""

    def __init__(self, wait: wait_base) -> None:
        self._wait = wait

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self._wait(retry_state) * random.uniform(0.5, 1.0)


_NO_RETRY = tenacity.Retrying()


class Backoff:
    """Delays that double from ``initial`` up to ``maximum`` seconds, each jittered to 50-100%."""

    __slots__ = ("initial", "maximum", "wait")

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        #: The tenacity wait strategy of this policy.
        self.wait: wait_base = _Jittered(tenacity.wait_exponential(multiplier=initial, max=maximum))

    def delay(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (1-based)."""
        state = tenacity.RetryCallState(_NO_RETRY, None, (), {})
        state.attempt_number = max(1, attempt)
        return self.wait(state)

    def pause(self, attempt: int, stop: threading.Event) -> bool:
        """Wait before retry number ``attempt``; True when ``stop`` was set first."""
        return stop.wait(self.delay(attempt))

    def retrying(
        self,
        stop: threading.Event,
        retry_on: type[BaseException] | tuple[type[BaseException], ...],
        *,
        give_up_after: float | None = GIVE_UP_AFTER,
    ) -> tenacity.Retrying:
        """A tenacity retrier of calls that raise ``retry_on``, waiting this policy's delays;
        ``stop`` ends it (cutting its wait short), and so does ``give_up_after`` seconds.
        Once it ends, the last error is raised."""
        ends: tenacity.stop.stop_base = tenacity.stop_when_event_set(stop)
        if give_up_after is not None:
            ends = ends | tenacity.stop_after_delay(give_up_after)

        def sleep(seconds: float) -> None:
            stop.wait(seconds)

        return tenacity.Retrying(
            wait=self.wait,
            stop=ends,
            sleep=sleep,
            retry=tenacity.retry_if_exception_type(retry_on),
            reraise=True,
        )
