"""OpenTelemetry, when installed: the trace context stored at emit, and Publish request spans.

This is the only module that imports ``opentelemetry``; without it every function here does
nothing. The attributes that carry a context on a message are defined in ``_trace_context``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._trace_context import ATTR_TRACEPARENT, ATTR_TRACESTATE, MAX_TRACESTATE_BYTES, is_traceparent

if TYPE_CHECKING:
    from opentelemetry.trace import Link, Tracer, TracerProvider

    from ._errors import PublishError
    from ._message import Message

try:
    from opentelemetry import trace as _otel
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the otel extra is not installed
    _otel = None  # type: ignore[assignment]
    _PROPAGATOR: Any = None
    _NO_OP_PROVIDERS: tuple[type, ...] = ()
else:
    _PROPAGATOR = TraceContextTextMapPropagator()
    _NO_OP_PROVIDERS = (_otel.NoOpTracerProvider, _otel.ProxyTracerProvider)

__all__ = ["PublishTracing", "current_trace"]

_SCOPE = "mongo_outbox"


def current_trace() -> dict[str, str] | None:
    """The current span's W3C context as stored on an outbox document, or None without one."""
    if _otel is None or not _otel.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    traceparent = carrier.get("traceparent")
    if traceparent is None:
        return None
    stored = {"traceparent": traceparent}
    tracestate = carrier.get("tracestate", "")
    while len(tracestate) > MAX_TRACESTATE_BYTES:  # ASCII: characters are bytes
        tracestate = tracestate.rpartition(",")[0]
    if tracestate:
        stored["tracestate"] = tracestate
    return stored


class PublishTracing:
    """Runs each Publish request in a PRODUCER span linked to its messages' trace contexts.

    Spans are made only when a real tracer provider is configured (``tracer_provider``, else
    the global one); with the API's default no-op provider the request runs bare.
    """

    __slots__ = ("_fixed", "_provider", "_tracer")

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._fixed = tracer_provider
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None

    def _current_tracer(self) -> Tracer | None:
        if _otel is None:
            return None
        provider = self._fixed if self._fixed is not None else _otel.get_tracer_provider()
        if provider is not self._provider:  # the global provider can be set after we start
            self._provider = provider
            enabled = not isinstance(provider, _NO_OP_PROVIDERS)
            self._tracer = provider.get_tracer(_SCOPE) if enabled else None
        return self._tracer

    def publish(
        self, path: str, batch: Sequence[Message], send: Callable[[], PublishError | None]
    ) -> PublishError | None:
        """Call ``send`` (one Publish request of ``batch`` to topic ``path``) inside a span."""
        tracer = self._current_tracer()
        if tracer is None:
            return send()
        parts = path.split("/")  # projects/<project>/topics/<topic>
        project, topic = parts[1] if len(parts) > 1 else "", parts[-1]
        with tracer.start_as_current_span(
            f"{topic} publish",
            kind=_otel.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "gcp_pubsub",
                "messaging.destination.name": topic,
                "messaging.batch.message_count": len(batch),
                "messaging.operation.name": "publish",
                "messaging.operation.type": "send",
                "gcp.project_id": project,
            },
            links=_links(batch),
        ) as span:
            error = send()
            if error is not None:
                span.record_exception(error.__cause__ or error)
                span.set_status(_otel.Status(_otel.StatusCode.ERROR, str(error)))
        return error


_MAX_LINKS = 128


def _links(batch: Sequence[Message]) -> list[Link]:
    """One link per distinct, well-formed trace context among the messages."""
    links: dict[str, Link] = {}
    for message in batch:
        traceparent = message.attributes.get(ATTR_TRACEPARENT)
        if traceparent is None or traceparent in links or not is_traceparent(traceparent):
            continue
        if len(links) >= _MAX_LINKS:
            break  # the SDK keeps 128 links per span by default: building more is waste
        # Parsed here rather than by the propagator's extract(), which costs 4x more.
        tracestate = message.attributes.get(ATTR_TRACESTATE)
        context = _otel.SpanContext(
            int(traceparent[3:35], 16),
            int(traceparent[36:52], 16),
            is_remote=True,
            trace_flags=_otel.TraceFlags(int(traceparent[53:55], 16)),
            trace_state=_otel.TraceState.from_header([tracestate]) if tracestate else None,
        )
        links[traceparent] = _otel.Link(context)
    return list(links.values())
