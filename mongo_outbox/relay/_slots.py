"""Ordering slots: Pub/Sub orders per topic and key, so that is the unit that waits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._event import Message

__all__ = ["key_of", "message_slot", "slot_of"]


def key_of(doc: Mapping[str, Any]) -> str | None:
    """The ordering key of an outbox document (None when absent or malformed)."""
    key = doc.get("key")
    return key if isinstance(key, str) and key else None


def slot_of(doc: Mapping[str, Any], default_topic: str | None) -> str | None:
    """The ordering slot of a document: its key on its topic (None without a key)."""
    key = key_of(doc)
    if key is None:
        return None
    topic = doc.get("topic")
    return f"{topic if isinstance(topic, str) else default_topic or ''}\n{key}"


def message_slot(message: Message) -> str | None:
    """The ordering slot of a message whose topic has been resolved."""
    if message.ordering_key is None:
        return None
    return f"{message.topic or ''}\n{message.ordering_key}"
