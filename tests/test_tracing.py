"""OpenTelemetry: the trace context from emit to the published message, and publish spans.

Each test uses its own SDK ``TracerProvider`` with an in-memory exporter, passed explicitly:
the global provider is never set, so nothing leaks into other tests.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import bson
import pytest
from bson.raw_bson import RawBSONDocument
from google.api_core import exceptions as gexc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from mongo_outbox import PermanentPublishError, ValidationError, outbox_transaction
from mongo_outbox._document import Event, build_document, event_from_raw
from mongo_outbox._formats import MessageFormat
from mongo_outbox._limits import MAX_ATTRIBUTES
from mongo_outbox._message import Message, message_from_document
from mongo_outbox._transaction import _EventBuffer
from mongo_outbox.publishers import PubSubPublisher

TRACEPARENT = f"00-{'a1' * 16}-{'b2' * 8}-01"


@pytest.fixture
def tracing() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _emit(**kwargs: Any) -> dict[str, Any]:
    """The outbox document ``tx.emit`` would write (the buffer both transaction shells use)."""
    buffer = _EventBuffer()
    buffer.emit("OrderCreated", {"id": 7}, topic="orders", **kwargs)
    (doc,) = buffer.take()
    return doc


def _traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _trace_attributes(message: Message) -> dict[str, str]:
    return {k: v for k, v in message.attributes.items() if k.startswith("googclient_")}


# -- emit ------------------------------------------------------------------------------------


def test_emit_without_a_span_stores_no_trace():
    assert "trace" not in _emit()


def test_emit_inside_an_invalid_span_stores_no_trace():
    with trace.use_span(NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)):
        assert "trace" not in _emit()


def test_emit_inside_a_span_stores_its_w3c_context(tracing):
    provider, _ = tracing
    with provider.get_tracer("test").start_as_current_span("request") as span:
        doc = _emit()
    assert doc["trace"] == {"traceparent": _traceparent(span.get_span_context())}


def test_emit_stores_the_tracestate_cut_to_whole_members_within_512_bytes():
    members = [f"m{i:02d}=" + "v" * 96 for i in range(8)]  # 8 x 100 characters
    state = trace.TraceState([tuple(m.split("=")) for m in members])
    context = SpanContext(0xA1, 0xB2, is_remote=True, trace_flags=TraceFlags(1), trace_state=state)
    with trace.use_span(NonRecordingSpan(context)):
        doc = _emit()
    assert doc["trace"]["traceparent"] == f"00-{0xA1:032x}-{0xB2:016x}-01"
    assert doc["trace"]["tracestate"] == ",".join(members[:5])  # 5 x 100 + 4 commas


def test_relay_publishes_the_stored_context_as_googclient_attributes():
    doc = _emit()
    doc["trace"] = {"traceparent": TRACEPARENT, "tracestate": "vendor=x"}
    message = message_from_document(doc)
    assert _trace_attributes(message) == {
        "googclient_traceparent": TRACEPARENT,
        "googclient_tracestate": "vendor=x",
    }
    del doc["trace"]
    assert _trace_attributes(message_from_document(doc)) == {}


@pytest.mark.parametrize(
    "trace_field",
    [
        "00-garbage",
        ["traceparent", TRACEPARENT],
        {},
        {"traceparent": 7},
        {"traceparent": "not a traceparent"},
        {"traceparent": TRACEPARENT.upper()},
        {"traceparent": f"00-{'0' * 32}-{'b2' * 8}-01"},  # all-zero trace id
        {"traceparent": f"00-{'a1' * 16}-{'0' * 16}-01"},  # all-zero span id
        {"traceparent": f"ff-{'a1' * 16}-{'b2' * 8}-01"},  # forbidden version
        {"tracestate": "vendor=x"},
    ],
)
def test_malformed_trace_field_adds_no_attribute_and_is_not_poison(trace_field):
    doc = _emit()
    doc["trace"] = trace_field
    event = event_from_raw(RawBSONDocument(bson.encode(doc)), None)
    assert isinstance(event, Event), event
    assert _trace_attributes(event.message) == {}


@pytest.mark.parametrize("tracestate", [7, "", "x" * 513, "vendor=é", "a=1\nb=2"])
def test_malformed_tracestate_is_left_out_and_the_traceparent_kept(tracestate):
    doc = _emit()
    doc["trace"] = {"traceparent": TRACEPARENT, "tracestate": tracestate}
    message = message_from_document(doc)
    assert _trace_attributes(message) == {"googclient_traceparent": TRACEPARENT}


def test_attribute_count_leaves_room_for_every_attribute_the_relay_adds(tracing):
    provider, _ = tracing
    attributes = {f"a{i}": "v" for i in range(90)}
    with provider.get_tracer("test").start_as_current_span("request"):
        doc = _emit(attributes=attributes)
        with pytest.raises(ValidationError, match=r"91 attributes given.*at most 90"):
            _emit(attributes={**attributes, "a90": "v"})
    doc["trace"]["tracestate"] = "vendor=x"
    doc["content_type"] = "application/json"
    message = message_from_document(doc, fmt=MessageFormat("urn:x", replay=True))
    assert len(message.attributes) == MAX_ATTRIBUTES
    with pytest.raises(ValidationError, match="'googclient_traceparent' is reserved"):
        _emit(attributes={"googclient_traceparent": TRACEPARENT})


# -- publish spans (a fake GAPIC client) -------------------------------------------------------


class FakeGapic:
    """Records Publish requests; raises ``error`` when given one."""

    def __init__(self, error: Exception | None = None) -> None:
        self.requests: list[Any] = []
        self._error = error

    def publish(self, *, request: Any, retry: Any = None, timeout: Any = None) -> None:
        self.requests.append(request)
        if self._error is not None:
            raise self._error


def _messages(*traces: dict[str, str] | None) -> list[Message]:
    messages = []
    for n, trace_field in enumerate(traces):
        doc = build_document("T", b"x", topic="orders", key=f"k{n}")
        if trace_field is not None:
            doc["trace"] = trace_field
        messages.append(message_from_document(doc))
    return messages


def test_each_publish_request_is_a_producer_span_linked_to_its_events(tracing):
    provider, exporter = tracing
    other = f"00-{'c3' * 16}-{'d4' * 8}-00"
    messages = _messages(
        {"traceparent": TRACEPARENT, "tracestate": "vendor=x"},
        None,
        {"traceparent": other},
        {"traceparent": TRACEPARENT, "tracestate": "vendor=x"},  # same context: one link
    )
    publisher = PubSubPublisher("p", client=FakeGapic(), tracer_provider=provider)
    assert publisher.publish(messages) == [None] * 4
    (span,) = exporter.get_finished_spans()
    assert span.name == "orders publish"
    assert span.kind is SpanKind.PRODUCER
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "messaging.system": "gcp_pubsub",
        "messaging.destination.name": "orders",
        "messaging.batch.message_count": 4,
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
        "gcp.project_id": "p",
    }
    links = [(_traceparent(link.context), link.context.trace_state) for link in span.links]
    assert links == [
        (TRACEPARENT, trace.TraceState([("vendor", "x")])),
        (other, trace.TraceState()),
    ]
    assert all(link.context.is_remote for link in span.links)


def test_a_failed_publish_request_is_recorded_on_its_span(tracing):
    provider, exporter = tracing
    client = FakeGapic(gexc.NotFound("topic not found"))
    publisher = PubSubPublisher("p", client=client, tracer_provider=provider)
    (error,) = publisher.publish(_messages(None))
    assert isinstance(error, PermanentPublishError)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert "does not exist" in (span.status.description or "")
    assert [e.attributes["exception.type"] for e in span.events] == [
        "google.api_core.exceptions.NotFound"
    ]


def test_without_a_configured_provider_no_span_is_made(tracing, monkeypatch):
    provider, exporter = tracing
    client = FakeGapic()
    publisher = PubSubPublisher("p", client=client)
    # The API's default provider: requests go out bare.
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    assert publisher.publish(_messages({"traceparent": TRACEPARENT})) == [None]
    monkeypatch.setattr(trace, "get_tracer_provider", trace.NoOpTracerProvider)
    assert publisher.publish(_messages(None)) == [None]
    assert len(client.requests) == 2
    # A global provider set after the publisher was made is picked up.
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    assert publisher.publish(_messages(None)) == [None]
    assert [s.name for s in exporter.get_finished_spans()] == ["orders publish"]


def test_without_opentelemetry_nothing_changes():
    # Blocking the import stands in for an environment without the otel extra.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry.trace"] = None
        from mongo_outbox import _tracing
        from mongo_outbox._document import build_document
        from mongo_outbox._message import message_from_document
        from mongo_outbox.publishers import PubSubPublisher
        assert _tracing._otel is None and _tracing.current_trace() is None
        doc = build_document("T", b"x", topic="orders")
        doc["trace"] = {"traceparent": "00-%s-%s-01" % ("a1" * 16, "b2" * 8)}
        message = message_from_document(doc)
        class Client:
            def publish(self, **kwargs):
                self.request = kwargs["request"]
        client = Client()
        assert PubSubPublisher("p", client=client).publish([message]) == [None]
        assert "googclient_traceparent" in client.request.messages[0].attributes
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


# -- end to end: real replica set and Pub/Sub emulator ---------------------------------------


def _emit_in_span(client, db_name, tracer, n):
    """Emit an event inside a new span; return its id and the span's context."""
    with (
        tracer.start_as_current_span(f"POST /orders/{n}") as span,
        outbox_transaction(client, database=db_name) as tx,
    ):
        event_id = tx.emit("OrderCreated", {"id": n}, key="k")
    return event_id, span.get_span_context()


def test_trace_continues_from_emit_to_subscriber_and_publish_span(
    client, db_name, pubsub, relay_factory, tracing
):
    provider, exporter = tracing
    tracer = provider.get_tracer("test")
    topic, sub = pubsub.topic()
    # One traced event before the relay starts (its sweep reads it), one while it runs (its
    # change stream, usually), and one without a span.
    contexts = dict([_emit_in_span(client, db_name, tracer, 1)])
    with outbox_transaction(client, database=db_name) as tx:
        untraced_id = tx.emit("OrderCreated", {"id": 2}, key="k")
    publisher = PubSubPublisher(pubsub.project, tracer_provider=provider)
    relay = relay_factory(db_name, publisher=publisher, default_topic=topic)
    sub.pull_until(2)
    event_id, context = _emit_in_span(client, db_name, tracer, 3)
    contexts[event_id] = context
    received = sub.pull_until(3)
    relay.stop()  # joins the relay: every publish span has ended
    publisher.close()

    by_id = {m.attributes["outbox_event_id"]: m for m in received}
    assert set(by_id) == {str(i) for i in [*contexts, untraced_id]}
    assert not [k for k in by_id[str(untraced_id)].attributes if k.startswith("googclient_")]
    publish_spans = [s for s in exporter.get_finished_spans() if s.name == f"{topic} publish"]
    for event_id, context in contexts.items():
        attributes = by_id[str(event_id)].attributes
        assert attributes["googclient_traceparent"] == _traceparent(context)
        assert f"-{context.trace_id:032x}-" in attributes["googclient_traceparent"]
        assert "googclient_tracestate" not in attributes
        ids = (context.trace_id, context.span_id)
        linked = [
            s
            for s in publish_spans
            if ids in [(k.context.trace_id, k.context.span_id) for k in s.links]
        ]
        assert linked, f"no publish span links to event {event_id}"
        for span in linked:
            assert span.kind is SpanKind.PRODUCER
            assert span.status.status_code is StatusCode.UNSET
            assert span.attributes is not None
            assert span.attributes["messaging.system"] == "gcp_pubsub"
            assert span.attributes["messaging.destination.name"] == topic
            assert span.attributes["messaging.batch.message_count"] >= 1
            assert span.context.trace_id != context.trace_id  # linked, not a child
