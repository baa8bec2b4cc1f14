"""Exceptions raised by the test-service helpers."""

from __future__ import annotations

__all__ = ["ServiceStartError", "ServiceUnavailable"]


class ServiceUnavailable(RuntimeError):
    """A real service needed by the tests cannot be found or started.

    The message says how to make the service available.
    """


class ServiceStartError(ServiceUnavailable):
    """A service binary was found but the process did not become ready."""
