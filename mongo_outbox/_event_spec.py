"""What ``@mongo_outbox.typed.event`` declares of a model class, and how ``emit`` reads it.

Pure: a model is only duck-typed (``model_dump``), so the core imports nothing of pydantic.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bson import ObjectId

from ._errors import ValidationError

__all__ = ["EVENT_SPEC", "EventSpec", "resolve_event"]

#: The class attribute where ``mongo_outbox.typed.event`` stores a model class's :class:`EventSpec`.
EVENT_SPEC = "__outbox_event__"


@dataclass(frozen=True, slots=True)
class EventSpec:
    """What ``@event`` declares of a model class: its type, topic and ordering key.

    ``key`` is a field name, a function of the model, or None (no ordering). Pure: the model is
    only duck-typed (``model_dump``), so the core needs no pydantic.
    """

    type: str
    topic: str | None
    key: str | Callable[[Any], Any] | None

    def key_of(self, model: Any) -> str | None:
        """The ordering key of ``model`` (a field's value, or the key function's result)."""
        if self.key is None:
            return None
        value = self.key(model) if callable(self.key) else getattr(model, self.key)
        if value is None:
            raise ValidationError(
                f"event {self.type!r} has no ordering key: "
                + (
                    f"its key function returned None for {model!r}"
                    if callable(self.key)
                    else f"field {self.key!r} is None"
                )
            )
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, float)) or not isinstance(value, (int, uuid.UUID, ObjectId)):
            raise ValidationError(
                f"event {self.type!r}: the ordering key must be a str (an int, UUID or ObjectId "
                f"is turned into one), got {type(value).__name__}"
            )
        return str(value)


def resolve_event(event: Any, payload: Any, topic: Any, key: Any) -> tuple[Any, Any, Any, Any]:
    """``(type, payload, topic, key)`` of an ``emit`` call: as given for a type string, from
    the class's ``@event`` declaration for a model (payload ``model_dump(mode="json")``).

    Raises :class:`ValidationError` at once on misuse: a model whose class is not declared, or
    a model given with a payload, topic or key (they come from the class).
    """
    if isinstance(event, str):
        return event, payload, topic, key
    # The class's own declaration: a subclass of an event class is not that event.
    spec = type(event).__dict__.get(EVENT_SPEC)
    if not isinstance(spec, EventSpec):
        raise ValidationError(
            f"cannot emit a {type(event).__name__}: pass an event type (str) and a payload, or "
            "a model whose class is declared with @mongo_outbox.typed.event(...)"
        )
    given = [
        name
        for name, value in (("a payload", payload), ("topic=", topic), ("key=", key))
        if value is not None
    ]
    if given:
        raise ValidationError(
            f"emit({type(event).__name__}(...)) takes no {' or '.join(given)}: the model is "
            f"its own payload, and @event on {type(event).__name__} names its topic and key"
        )
    return spec.type, event.model_dump(mode="json"), spec.topic, spec.key_of(event)
