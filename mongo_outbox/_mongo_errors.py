"""MongoDB's errors mapped to the package's, at one boundary.

Which server codes mean what (access refused, a standalone server, a collection that exists),
and the checks every entry point makes: the server is a replica set, the outbox collection
exists, it can be reached at all (:class:`~mongo_outbox.ConnectError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    CollectionInvalid,
    ConnectionFailure,
    OperationFailure,
    ServerSelectionTimeoutError,
)

from ._errors import REPLICA_SET_FIX, ConfigurationError, ConnectError

__all__ = [
    "MAX_TIME_EXPIRED",
    "check_replica_set",
    "connect_error",
    "create_collection",
    "is_auth_failure",
    "outbox_missing",
    "raise_if_standalone",
    "raise_mapped",
    "require_outbox",
]

_UNAUTHORIZED, _AUTHENTICATION_FAILED = 13, 18
_ILLEGAL_OPERATION = 20
_NAMESPACE_EXISTS = 48
MAX_TIME_EXPIRED = 50


def is_auth_failure(exc: BaseException | None) -> bool:
    """Whether MongoDB refused ``exc``'s command for want of a privilege or a valid login."""
    return isinstance(exc, OperationFailure) and exc.code in (_UNAUTHORIZED, _AUTHENTICATION_FAILED)


def raise_if_standalone(exc: BaseException | None) -> None:
    """Raise a ConfigurationError naming the fix when ``exc`` says a transaction ran on a
    standalone server."""
    if (
        isinstance(exc, OperationFailure)
        and exc.code == _ILLEGAL_OPERATION
        and "Transaction numbers" in str(exc)
    ):
        raise ConfigurationError(
            f"outbox transactions cannot run on a standalone MongoDB server; {REPLICA_SET_FIX}"
        ) from exc


def raise_mapped(exc: BaseException | None, doing: str) -> None:
    """Raise the package's error for the failure ``exc`` of the library's own call (a
    standalone server: ConfigurationError; no server reachable: ConnectError); else return."""
    raise_if_standalone(exc)
    if isinstance(exc, ServerSelectionTimeoutError):
        raise connect_error(f"cannot reach MongoDB to {doing}", exc) from exc


def connect_error(
    what: str, exc: ConnectionFailure, scrub: Callable[[str], str] = str
) -> ConnectError:
    """A ConnectError saying ``what`` failed, with the driver's first words of why."""
    first = scrub(str(exc)).split(" (configured timeouts")[0][:300]
    return ConnectError(f"{what}: {first}")


def check_replica_set(
    client: MongoClient[Any], where: str, scrub: Callable[[str], str] = str
) -> None:
    """Ask the server ``client`` reaches whether it is a replica set (or a mongos).

    Raises ConnectError when it cannot be reached, ConfigurationError when it refuses us or is
    standalone; ``where`` names it (redacted) and ``scrub`` redacts the driver's words.
    """
    try:
        hello = client.admin.command("hello")
    except ConnectionFailure as exc:
        raise connect_error(f"cannot connect to MongoDB at {where}", exc, scrub) from exc
    except OperationFailure as exc:
        raise ConfigurationError(f"MongoDB at {where} refused us: {scrub(str(exc))}") from exc
    if "setName" not in hello and hello.get("msg") != "isdbgrid":
        raise ConfigurationError(f"MongoDB at {where} is a standalone server; {REPLICA_SET_FIX}")


def create_collection(db: Database[Any], name: str) -> None:
    """Create collection ``name`` unless it exists (idempotent, also when two race)."""
    try:
        db.create_collection(name)
    except CollectionInvalid:
        pass
    except OperationFailure as exc:
        if exc.code != _NAMESPACE_EXISTS:
            raise
    except ServerSelectionTimeoutError as exc:
        raise connect_error(f"cannot reach MongoDB to create {db.name}.{name}", exc) from exc


def outbox_missing(outbox: Collection[Any]) -> str | None:
    """Why ``outbox`` cannot be relayed or inspected (None when it exists); creates nothing.

    Raises ConfigurationError when MongoDB refuses to list the collections.
    """
    db = outbox.database
    try:
        names = db.list_collection_names(filter={"name": outbox.name}, authorizedCollections=True)
    except OperationFailure as exc:
        if is_auth_failure(exc):
            raise ConfigurationError(
                f"MongoDB refused to list the collections of {db.name}: grant the relay's user "
                "listCollections on it (or a role with it, such as read)"
            ) from exc
        raise
    if outbox.name in names:
        return None
    return (
        f"no outbox collection {db.name}.{outbox.name}: check --database/--collection, "
        "or create it with `mongo-outbox init`"
    )


def require_outbox(outbox: Collection[Any]) -> None:
    """Raise ConfigurationError unless ``outbox`` exists (a typo creates nothing)."""
    missing = outbox_missing(outbox)
    if missing is not None:
        raise ConfigurationError(missing)
