"""Typed events: pydantic models in (``tx.emit(model)``), out (inbox handlers by event class),
and documented (an AsyncAPI 3.0 document of every declared event).

Needs the extra ``mongo-outbox[pydantic]``; the rest of the package imports nothing of pydantic.

.. code-block:: python

    @event("OrderPlaced", topic="orders", key="order_id")
    class OrderPlaced(BaseModel):
        order_id: str
        total_cents: int

    tx.emit(OrderPlaced(order_id="o-1", total_cents=1200))
    inbox.subscribe(subscription, {OrderPlaced: handle}, stop=stop)  # handle(tx, event, message)
"""

from __future__ import annotations

import builtins
import copy
import importlib
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, Literal, TypeVar

try:
    import pydantic
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mongo_outbox.typed needs pydantic: pip install 'mongo-outbox[pydantic]'"
    ) from exc

from ._errors import ConfigurationError, OutboxError
from ._event_spec import EVENT_SPEC, EventSpec
from ._formats import (
    ATTR_CREATED_AT,
    ATTR_EVENT_ID,
    ATTR_EVENT_TYPE,
    CE_ID,
    CE_SOURCE,
    CE_SPECVERSION,
    CE_TIME,
    CE_TYPE,
    CONTENT_TYPE,
    FORMATS,
    JSON,
    check_source,
)
from ._limits import _check_type, check_topic
from ._trace_context import ATTR_TRACEPARENT, ATTR_TRACESTATE

__all__ = [
    "Handlers",
    "OnInvalid",
    "RejectedMessage",
    "asyncapi",
    "event",
    "event_classes",
    "event_spec",
]

log = logging.getLogger("mongo_outbox.inbox")

M = TypeVar("M", bound=type[pydantic.BaseModel])

#: What a typed inbox does with a message it cannot hand to a handler (no handler for its
#: type, or a payload that fails validation): ``record`` acks it and records why in its inbox
#: record (``rejected``); ``nack`` leaves it to the subscription's dead-letter topic.
OnInvalid = Literal["record", "nack"]


def event(
    type: str,
    *,
    topic: str | None = None,
    key: str | Callable[[Any], Any] | None = None,
) -> Callable[[M], M]:
    """Declare a pydantic model class as the event ``type``, published to ``topic`` (None: the
    relay's default topic) with the ordering key ``key``: a field name, or a function of the
    model returning the key (None: no ordering).

    ``tx.emit(model)`` then takes the type, topic and key from the class and publishes
    ``model.model_dump(mode="json")`` as JSON. Raises at once:
    :class:`~mongo_outbox.ValidationError` for a bad type or topic,
    :class:`~mongo_outbox.ConfigurationError` for a key field the model lacks or a class that is
    no pydantic model.
    """
    _check_type(type)
    check_topic(topic)
    if key is not None and not isinstance(key, str) and not callable(key):
        raise ConfigurationError(f"@event key must be a field name or a function, not {key!r}")

    def declare(cls: M) -> M:
        if not (isinstance(cls, builtins.type) and issubclass(cls, pydantic.BaseModel)):
            raise ConfigurationError(f"@event declares pydantic models, not {cls!r}")
        model: builtins.type[pydantic.BaseModel] = cls
        if isinstance(key, str) and key not in model.model_fields:
            raise ConfigurationError(
                f"@event({type!r}) names the key field {key!r}, which {cls.__name__} lacks "
                f"(its fields: {', '.join(model.model_fields) or 'none'})"
            )
        setattr(cls, EVENT_SPEC, EventSpec(type, topic, key))
        return cls

    return declare


def event_spec(cls: type[Any]) -> EventSpec:
    """The declaration of an ``@event`` class (raises ConfigurationError for another class)."""
    spec = cls.__dict__.get(EVENT_SPEC) if isinstance(cls, builtins.type) else None
    if not isinstance(spec, EventSpec):
        raise ConfigurationError(f"{cls!r} is not declared with @mongo_outbox.typed.event(...)")
    return spec


def event_classes(
    module_or_classes: ModuleType | str | Iterable[type[pydantic.BaseModel]],
) -> list[type[pydantic.BaseModel]]:
    """The ``@event`` classes of a module (or module name): every one in its namespace, those
    it imports included; or the classes given, checked. Sorted by event type."""
    if isinstance(module_or_classes, str):
        module_or_classes = importlib.import_module(module_or_classes)
    if isinstance(module_or_classes, ModuleType):
        found = {
            cls
            for cls in vars(module_or_classes).values()
            if isinstance(cls, builtins.type)
            and isinstance(cls.__dict__.get(EVENT_SPEC), EventSpec)
        }
    else:
        found = set(module_or_classes)
        for cls in found:
            event_spec(cls)
    classes = sorted(found, key=lambda cls: (event_spec(cls).type, cls.__qualname__))
    for first, second in itertools.pairwise(classes):
        if event_spec(first).type == event_spec(second).type:
            raise ConfigurationError(
                f"{first.__qualname__} and {second.__qualname__} are both declared as event "
                f"{event_spec(first).type!r}"
            )
    return classes


# -- consuming ---------------------------------------------------------------------------------


class RejectedMessage(OutboxError):
    """A typed inbox refused a message (no handler for its type, or an invalid payload) under
    the ``nack`` policy: its transaction aborts and the message is nacked."""


class Handlers:
    """Inbox handlers by event class: ``{OrderPlaced: handle}``, ``handle(tx, event, message)``.

    Pass it (or the plain mapping, for the default policy) where an :class:`~mongo_outbox.Inbox`
    takes a handler. Each message is parsed by its type attribute (``outbox_event_type``, or
    ``ce-type`` in the CloudEvents format) into its class and validated; the handler runs in
    the inbox's transaction. A message of a type without a handler, or whose payload fails
    validation, never reaches a handler: ``on_invalid="record"`` (default) acks it and records
    the reason and the data in its inbox record's ``rejected`` field; ``"nack"`` aborts and
    nacks it (:class:`RejectedMessage`), so a subscription with a dead-letter topic moves it
    there after its maximum delivery attempts (without one, Pub/Sub redelivers it forever).
    Either way it is logged with its event id and the reason, and other messages go on.
    """

    def __init__(
        self,
        handlers: Mapping[type[pydantic.BaseModel], Callable[..., Any]],
        *,
        on_invalid: OnInvalid = "record",
    ) -> None:
        if on_invalid not in ("record", "nack"):
            raise ConfigurationError(f"on_invalid must be 'record' or 'nack', not {on_invalid!r}")
        self.on_invalid = on_invalid
        self._routes: dict[str, tuple[type[pydantic.BaseModel], Callable[..., Any]]] = {}
        for cls in event_classes(handlers):
            handler = handlers[cls]
            if not callable(handler):
                raise ConfigurationError(f"the handler of {cls.__qualname__} is not callable")
            self._routes[event_spec(cls).type] = (cls, handler)

    def _bind_inbox(self, inbox: Any) -> Callable[[Any, Any], Any]:
        """The ``(tx, message)`` handler the inbox runs, recording rejections in ``inbox``."""
        from ._inbox import inbox_id

        records = inbox.client[inbox.database][inbox.collection]
        routes, nack = self._routes, self.on_invalid == "nack"

        def reject(tx: Any, message: Any, event_type: str | None, reason: str) -> Any:
            event_id = message.attributes.get(ATTR_EVENT_ID) or message.message_id
            log.warning(
                "event %s (type %s) rejected, %s: %s",
                event_id,
                event_type,
                "nacked for the dead-letter topic" if nack else "acked and recorded",
                reason,
                extra={"event_id": event_id, "event_type": event_type, "reason": reason},
            )
            if nack:
                raise RejectedMessage(f"event {event_id} (type {event_type}): {reason}")
            rejected = {"reason": reason, "data": bytes(message.data)}
            return records.update_one(
                {"_id": inbox_id(inbox.consumer, message)},
                {"$set": {"rejected": rejected}},
                session=tx.session,
            )

        def dispatch(tx: Any, message: Any) -> Any:
            attributes = message.attributes
            event_type = attributes.get(ATTR_EVENT_TYPE) or attributes.get(CE_TYPE)
            route = routes.get(event_type) if event_type is not None else None
            if route is None:
                return reject(tx, message, event_type, "no handler for this event type")
            cls, handler = route
            try:
                model = cls.model_validate_json(message.data)
            except pydantic.ValidationError as exc:
                return reject(tx, message, event_type, _invalid(cls, exc))
            return handler(tx, model, message)

        return dispatch

    def __call__(self, tx: Any, message: Any) -> Any:
        """Refuse to run outside an inbox: rejections are recorded in the inbox's records."""
        raise ConfigurationError(
            "Handlers run through an Inbox: inbox.process(message, handlers) or "
            "inbox.subscribe(subscription, handlers)"
        )


def _invalid(cls: type[pydantic.BaseModel], exc: pydantic.ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    details = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(payload)'}: {error['msg']}"
        for error in errors[:5]
    )
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"payload is not a valid {cls.__name__}: {details}{more}"


# -- AsyncAPI ----------------------------------------------------------------------------------

ASYNCAPI_VERSION = "3.0.0"
_BINDING_VERSION = "0.2.0"
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_DEFAULT_CHANNEL = "default"


def asyncapi(
    module_or_classes: ModuleType | str | Iterable[type[pydantic.BaseModel]],
    *,
    message_format: str = "outbox",
    cloudevents_source: str | None = None,
    title: str | None = None,
    version: str = "1.0.0",
) -> dict[str, Any]:
    """An AsyncAPI 3.0 document of the ``@event`` classes of a module (or the classes given).

    One channel per topic with the ``googlepubsub`` binding (events without a topic go to the
    channel ``default``, whose address is the relay's ``--default-topic``), one message per
    event type whose payload is the model's JSON Schema (nested models under
    ``components/schemas``), whose headers are the attributes the relay adds in
    ``message_format`` (``outbox``: ``outbox_*``; ``cloudevents``: ``ce-*``), with the ordering
    key in the message's ``googlepubsub`` binding; and a ``send`` operation per message.
    """
    if message_format not in FORMATS:
        raise ConfigurationError(
            f"message format {message_format!r} is unknown: use 'outbox' or 'cloudevents'"
        )
    if cloudevents_source is not None:
        if message_format != "cloudevents":
            raise ConfigurationError("cloudevents_source applies only to the cloudevents format")
        check_source(cloudevents_source)
    classes = event_classes(module_or_classes)
    if title is None:
        title = (
            f"{module_or_classes} events"
            if isinstance(module_or_classes, str)
            else f"{module_or_classes.__name__} events"
            if isinstance(module_or_classes, ModuleType)
            else "Events"
        )
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for cls in classes:
        spec = event_spec(cls)
        message_id = _ID_CHARS.sub("_", spec.type)
        channel_id = (
            _DEFAULT_CHANNEL
            if spec.topic is None
            else _ID_CHARS.sub("_", spec.topic.rsplit("/", 1)[-1])
        )
        channel = channels.get(channel_id)
        if channel is None:
            channel = channels[channel_id] = _channel(spec.topic)
        elif channel["address"] != spec.topic:
            raise ConfigurationError(
                f"topics {channel['address']!r} and {spec.topic!r} share the channel id "
                f"{channel_id!r}: rename one"
            )
        channel["messages"][message_id] = {"$ref": f"#/components/messages/{message_id}"}
        messages[message_id] = _message(cls, spec, message_format, cloudevents_source, schemas)
        operations[f"send_{message_id}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": f"Publish {spec.type} (via the outbox relay)",
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
        }
    components: dict[str, Any] = {"messages": messages}
    if schemas:
        components["schemas"] = dict(sorted(schemas.items()))
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Events published by mongo-outbox's relay to Google Cloud Pub/Sub, at least "
                "once: de-duplicate by the outbox_event_id attribute."
            ),
        },
        "defaultContentType": JSON,
        "channels": dict(sorted(channels.items())),
        "operations": operations,
        "components": components,
    }


def _channel(topic: str | None) -> dict[str, Any]:
    channel: dict[str, Any] = {"address": topic}
    if topic is None:
        channel["description"] = "The relay's default topic (--default-topic)."
    channel["messages"] = {}
    # The binding's schema requires schemaSettings: payloads are JSON, and no Pub/Sub schema
    # resource is attached to the topic (an empty name).
    channel["bindings"] = {
        "googlepubsub": {
            "bindingVersion": _BINDING_VERSION,
            "schemaSettings": {"encoding": "json", "name": ""},
        }
    }
    return channel


def _message(
    cls: type[pydantic.BaseModel],
    spec: EventSpec,
    message_format: str,
    cloudevents_source: str | None,
    schemas: dict[str, Any],
) -> dict[str, Any]:
    message: dict[str, Any] = {"name": spec.type, "title": cls.__name__}
    doc = (cls.__doc__ or "").strip()
    if doc:
        message["summary"] = doc.splitlines()[0]
    message["contentType"] = JSON
    message["headers"] = _headers(spec.type, message_format, cloudevents_source)
    message["payload"] = _payload_schema(cls, schemas)
    binding: dict[str, Any] = {"bindingVersion": _BINDING_VERSION}
    if spec.key is not None:
        binding["orderingKey"] = (
            f"the {spec.key} field"
            if isinstance(spec.key, str)
            else f"{getattr(spec.key, '__qualname__', 'a function')} of the event"
        )
    message["bindings"] = {"googlepubsub": binding}
    return message


def _headers(
    event_type: str, message_format: str, cloudevents_source: str | None
) -> dict[str, Any]:
    event_id = {
        "type": "string",
        "pattern": "^[0-9a-f]{24}$",
        "description": "The event id (an ObjectId in hex): de-duplicate by it.",
    }
    time = {
        "type": "string",
        "format": "date-time",
        "description": "When the event was emitted (UTC, milliseconds).",
    }
    properties: dict[str, Any]
    if message_format == "outbox":
        properties = {
            ATTR_EVENT_ID: event_id,
            ATTR_EVENT_TYPE: {"type": "string", "const": event_type},
            ATTR_CREATED_AT: time,
        }
    else:
        source: dict[str, Any] = {"type": "string", "format": "uri-reference"}
        if cloudevents_source is not None:
            source["const"] = cloudevents_source
        else:
            source["description"] = (
                "--cloudevents-source, by default mongo-outbox://<database>/<collection>."
            )
        properties = {
            CE_SPECVERSION: {"type": "string", "const": "1.0"},
            CE_ID: {**event_id, "description": "The event id (an ObjectId in hex)."},
            CE_TYPE: {"type": "string", "const": event_type},
            CE_SOURCE: source,
            CE_TIME: time,
            CONTENT_TYPE: {"type": "string", "const": JSON},
            ATTR_EVENT_ID: event_id,
        }
    required = list(properties)
    properties[ATTR_TRACEPARENT] = {
        "type": "string",
        "description": "W3C traceparent of the emitting span, when it was traced.",
    }
    properties[ATTR_TRACESTATE] = {"type": "string", "description": "W3C tracestate."}
    return {
        "type": "object",
        "description": "Pub/Sub attributes: these, and the attributes given to emit.",
        "properties": properties,
        "required": required,
        "additionalProperties": {"type": "string"},
    }


def _payload_schema(cls: type[pydantic.BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON Schema with its ``$defs`` moved to ``schemas`` (renamed on a clash)."""
    schema = copy.deepcopy(cls.model_json_schema(mode="serialization"))
    defs: dict[str, Any] = schema.pop("$defs", {})
    names: dict[str, str] = {}
    for name, definition in defs.items():
        target = _ID_CHARS.sub("_", name)
        known = schemas.get(target)
        if known is not None and known != _renamed(definition, names):
            target = f"{cls.__name__}.{target}"
        names[name] = target
    for name, definition in defs.items():
        schemas[names[name]] = _renamed(definition, names)
    result: dict[str, Any] = _renamed(schema, names)
    return result


def _renamed(value: Any, names: Mapping[str, str]) -> Any:
    """``value`` with every ``#/$defs/X`` reference pointing at ``#/components/schemas/...``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                name = v[len("#/$defs/") :]
                out[k] = f"#/components/schemas/{names.get(name, _ID_CHARS.sub('_', name))}"
            else:
                out[k] = _renamed(v, names)
        return out
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    return value


def dump(document: Mapping[str, Any], *, json_output: bool) -> str:
    """The document as YAML (PyYAML), or JSON when ``json_output``."""
    if json_output:
        import json

        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "YAML output needs PyYAML: pip install 'mongo-outbox[pydantic]', or write a .json file"
        ) from exc
    text: str = yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True, width=100)
    return text
