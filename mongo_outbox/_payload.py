"""A payload as the bytes to publish: dicts as compact JSON, str as UTF-8, bytes as they are."""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import json
import uuid
from collections.abc import Mapping
from typing import Any

from bson import Decimal128, ObjectId

from ._errors import ValidationError
from ._times import format_timestamp

__all__ = ["encode_payload", "encode_text", "utf8_len"]


def _json_default(value: Any) -> Any:
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, _dt.datetime):
        return format_timestamp(value)
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, Decimal128):
        return str(value.to_decimal())
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)  # the same set must encode to the same bytes every time
        except TypeError:
            return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def encode_payload(payload: Mapping[str, Any] | bytes | str) -> bytes:
    """Encode a payload as the bytes to publish.

    ``dict`` becomes compact UTF-8 JSON (ObjectId and UUID as strings, datetime as ISO 8601 UTC,
    Decimal/Decimal128 as decimal strings, bytes as base64); ``bytes`` pass as they are; ``str``
    is encoded as UTF-8.
    """
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return encode_text(payload, "payload")
    if isinstance(payload, Mapping):
        try:
            text = json.dumps(
                dict(payload),
                default=_json_default,
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
            )
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValidationError(
                f"payload cannot be encoded as JSON: {exc}; pass JSON-compatible values "
                "(or ObjectId, datetime, Decimal, UUID), or encode it yourself and pass bytes"
            ) from exc
        return encode_text(text, "payload")
    raise ValidationError(f"payload must be a dict, bytes or str, not {type(payload).__name__}")


def encode_text(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"{what} is not valid Unicode ({exc.reason} at index {exc.start}): "
            "a lone surrogate cannot be encoded as UTF-8"
        ) from exc


def utf8_len(value: str, what: str = "a string") -> int:
    if value.isascii():  # the common case, and no lone surrogate is ASCII
        return len(value)
    return len(encode_text(value, what))
