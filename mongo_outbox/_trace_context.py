"""The W3C trace context an event carries: its attribute names and what a valid one is."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeGuard

__all__ = [
    "ATTR_TRACEPARENT",
    "ATTR_TRACESTATE",
    "MAX_TRACESTATE_BYTES",
    "TRACE_OVERHEAD",
    "add_trace_attributes",
    "is_traceparent",
]

# The event's W3C trace context, under the names google-cloud-pubsub's own tracing uses.
ATTR_TRACEPARENT = "googclient_traceparent"
ATTR_TRACESTATE = "googclient_tracestate"
MAX_TRACESTATE_BYTES = 512
_TRACEPARENT_BYTES = 55  # version 00: "00-<32 hex>-<16 hex>-<2 hex>"
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# W3C tracestate: comma-separated key=value list members (value: printable, no "," or "=").
_TRACESTATE_MEMBER = (
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}="
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TRACESTATE_RE = re.compile(rf"{_TRACESTATE_MEMBER}(?:[ \t]*,[ \t]*{_TRACESTATE_MEMBER})*")
#: The most bytes a kept trace context adds to a message (names and longest values).
TRACE_OVERHEAD = (
    len(ATTR_TRACEPARENT) + len(ATTR_TRACESTATE) + _TRACEPARENT_BYTES + MAX_TRACESTATE_BYTES
)


def is_traceparent(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is a W3C ``traceparent`` this library would store (version 00 form)."""
    return (
        isinstance(value, str)
        and _TRACEPARENT_RE.fullmatch(value) is not None
        and not value.startswith("ff")
        and value[3:35] != "0" * 32
        and value[36:52] != "0" * 16
    )


def add_trace_attributes(attributes: dict[str, str], trace: Any) -> None:
    """Add a stored trace context as attributes; a malformed one is left out, never poison."""
    if not isinstance(trace, Mapping):
        return
    traceparent = trace.get("traceparent")
    if not is_traceparent(traceparent):
        return
    attributes[ATTR_TRACEPARENT] = traceparent
    tracestate = trace.get("tracestate")
    if (
        isinstance(tracestate, str)
        and len(tracestate) <= MAX_TRACESTATE_BYTES
        and _TRACESTATE_RE.fullmatch(tracestate)
    ):
        attributes[ATTR_TRACESTATE] = tracestate
