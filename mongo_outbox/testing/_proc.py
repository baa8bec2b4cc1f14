"""Process and network helpers shared by the service launchers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path | None, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it is missing."""
    if path is None:
        return "<no log file>"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``proc`` (started with a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def terminate_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group of ``proc``, wait, then SIGKILL it on timeout.

    A stopped (SIGSTOPped) group is continued so that it can handle SIGTERM.
    """
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        signal_group(proc, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Children (e.g. java under a shell wrapper) may outlive the leader.
    signal_group(proc, signal.SIGKILL)
    proc.wait()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` and reap the leader."""
    signal_group(proc, signal.SIGKILL)
    proc.wait()


def reap_quietly(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer: kill a still-running process group left behind by a crashed test run."""
    if proc.returncode is None:
        signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def sleep_step(deadline: float, step: float) -> None:
    """Sleep ``step`` seconds, but never past ``deadline`` (a ``time.monotonic`` value)."""
    time.sleep(max(0.0, min(step, deadline - time.monotonic())))
