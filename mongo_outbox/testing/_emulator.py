"""Start the real Google Cloud Pub/Sub emulator (shipped with the Google Cloud CLI)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from ._errors import ServiceStartError, ServiceUnavailable
from ._proc import (
    LOOPBACK,
    free_port,
    kill_group,
    log_tail,
    reap_quietly,
    signal_group,
    sleep_step,
    terminate_group,
)

__all__ = ["PubSubEmulator", "find_pubsub_emulator"]

_EMULATOR_RELPATH = ("platform", "pubsub-emulator", "bin", "cloud-pubsub-emulator")
_EMULATOR_MISSING = (
    "Pub/Sub emulator not found: install the Google Cloud CLI with its Pub/Sub emulator "
    "(`gcloud components install pubsub-emulator` or the google-cloud-cli-pubsub-emulator "
    "package) and a Java runtime on PATH, or set PUBSUB_EMULATOR_HOST to a running emulator"
)


def _java_available() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return True
    return shutil.which("java") is not None


def find_pubsub_emulator() -> str | None:
    """Return the path of the ``cloud-pubsub-emulator`` launcher, or ``None``.

    The SDK root is two levels above the resolved ``gcloud`` on ``PATH``; a Java
    runtime (``java`` on ``PATH`` or ``JAVA_HOME``) is required as well.
    """
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    sdk_root = os.path.dirname(os.path.dirname(os.path.realpath(gcloud)))
    emulator = os.path.join(sdk_root, *_EMULATOR_RELPATH)
    if not os.access(emulator, os.X_OK) or not _java_available():
        return None
    return emulator


class PubSubEmulator:
    """A Pub/Sub emulator process listening on ``127.0.0.1``.

    Point clients at it with ``PUBSUB_EMULATOR_HOST=<host>``; any project id is
    accepted.  Pulls on an empty subscription block for up to ~90 s unless the
    call passes a short ``timeout``.  Use as a context manager or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        emulator: str | None = None,
        *,
        port: int | None = None,
        startup_timeout: float = 60.0,
        bind_retries: int = 2,
    ) -> None:
        self._emulator = emulator
        self._requested_port = port
        self._port: int | None = port
        self._startup_timeout = startup_timeout
        self._bind_retries = bind_retries
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._tmpdir: str | None = None
        self._log_path: Path | None = None

    @property
    def port(self) -> int:
        """TCP port on ``127.0.0.1`` (known once started, or if given)."""
        if self._port is None:
            raise RuntimeError("PubSubEmulator has no port yet; call start() first")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the value for ``PUBSUB_EMULATOR_HOST``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the launcher (the process group leader), or ``None``."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """The emulator's combined stdout/stderr log."""
        return self._log_path

    def is_running(self) -> bool:
        """Whether the emulator process is alive (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> PubSubEmulator:
        """Start the emulator and wait until it serves requests.

        Raises :class:`ServiceUnavailable` if it is not installed and
        :class:`ServiceStartError` if it does not become ready in time.
        """
        if self.is_running():
            raise RuntimeError("PubSubEmulator is already running")
        if self._emulator is None:
            self._emulator = find_pubsub_emulator()
            if self._emulator is None:
                raise ServiceUnavailable(_EMULATOR_MISSING)
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="mongo-outbox-pubsub-")
        try:
            self._start_with_retries()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_with_retries(self) -> None:
        assert self._tmpdir is not None
        attempts = 1 + (self._bind_retries if self._requested_port is None else 0)
        for attempt in range(attempts):
            if self._requested_port is None:
                self._port = free_port()
            self._log_path = Path(self._tmpdir, f"pubsub-emulator-{attempt}.log")
            try:
                self._spawn_and_wait()
            except _BindFailed:
                if attempt + 1 == attempts:
                    raise ServiceStartError(self._failure("could not bind its port")) from None
                continue
            return

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the emulator's process group (SIGTERM, SIGKILL after ``timeout``) and clean up."""
        if self._proc is not None:
            terminate_group(self._proc, timeout)
            self._forget_process()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._log_path = None
        self._port = self._requested_port

    def pause(self) -> None:
        """Freeze the emulator (SIGSTOP): connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused emulator (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def __enter__(self) -> PubSubEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PubSubEmulator port={self._port} {state}>"

    # -- internals ----------------------------------------------------------------

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or not self.is_running():
            raise RuntimeError("PubSubEmulator is not running")
        signal_group(self._proc, sig)

    def _spawn_and_wait(self) -> None:
        if self._proc is not None:  # an earlier process that died on its own
            self._proc.wait()
            self._forget_process()
        assert self._emulator is not None
        assert self._log_path is not None
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [self._emulator, f"--host={LOOPBACK}", f"--port={self.port}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, reap_quietly, self._proc)
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        assert self._log_path is not None
        deadline = time.monotonic() + self._startup_timeout
        banner = f"Server started, listening on {self.port}"
        while True:
            log = self._log_path.read_text(encoding="utf-8", errors="replace")
            if "BindException" in log:
                # The emulator keeps running after failing to bind.
                raise _BindFailed
            code = self._proc.poll()
            if code is not None:
                raise ServiceStartError(self._failure(f"exited with status {code}"))
            if banner in log and self._http_ok():
                return
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    self._failure(f"not ready after {self._startup_timeout:g}s")
                )
            sleep_step(deadline, 0.1)

    def _http_ok(self) -> bool:
        # Loopback only: ignore any proxy settings from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.host}/", timeout=2) as resp:
                body: bytes = resp.read()
        except (urllib.error.URLError, OSError):
            return False
        return body.strip() == b"Ok"

    def _failure(self, what: str) -> str:
        return (
            f"Pub/Sub emulator {what} (port {self._port}); "
            f"tail of {self._log_path}:\n{log_tail(self._log_path)}"
        )

    def _kill(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)
            self._forget_process()

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None


class _BindFailed(Exception):
    """The emulator logged a BindException."""
