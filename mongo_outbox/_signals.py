"""SIGTERM/SIGINT for the long-running commands: the first finishes the batch, the second leaves.

Handlers belong to the process entry point: the console script (``cli.console``) keeps them
for the life of the process, so a second signal exits at once even while threads wind down;
``cli.main`` called in-process puts the caller's handlers back when the command returns, and
hands a second signal on to them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger("mongo_outbox.cli")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_EXIT_AT_ONCE = 1
_process_entry = False  # set by the console script only


def own_process() -> None:
    """Mark this process as run by the console script: signal handlers stay installed."""
    global _process_entry
    _process_entry = True


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event SIGTERM/SIGINT set while the block runs (a second signal leaves at once: the
    process exits when it is the console script's, else the caller's handler gets it)."""
    stop = threading.Event()
    previous = [(s, signal.getsignal(s)) for s in _SIGNALS]
    received: list[int] = []

    def restore() -> None:
        for signum, old in previous:
            signal.signal(signum, old)

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            if _process_entry:
                # Leave now; at-least-once delivery tolerates the lost batch.
                os._exit(_EXIT_AT_ONCE)
            restore()
            signal.raise_signal(signum)  # the caller's handler runs once this one returns
            return
        log.info("%s received: finishing the batch, then exiting", signal.Signals(signum).name)
        # Not stop.set() here: the main thread may hold the event's lock at this very moment.
        threading.Thread(target=stop.set, name="outbox-stop").start()

    for signum, _ in previous:
        signal.signal(signum, handler)
    try:
        yield stop
    finally:
        if not _process_entry:
            restore()
