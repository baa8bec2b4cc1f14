"""The AsyncAPI document of typed events: checked by the official parser, pinned byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import typed_events
import yaml
from pydantic import BaseModel, create_model
from typed_events import OrderPlaced, OrderShipped

from mongo_outbox import ConfigurationError
from mongo_outbox.testing.plugin import require_services
from mongo_outbox.typed import asyncapi, dump, event

JS = Path(__file__).resolve().parent / "js"
PINNED = Path(__file__).resolve().parent / "asyncapi" / "orders.yaml"


@pytest.fixture(scope="session")
def asyncapi_parser() -> Path:
    """The validating script, with ``@asyncapi/parser`` installed (``npm ci`` when missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        message = "node and npm are needed to run the official AsyncAPI parser"
        if require_services():
            pytest.fail(message)
        pytest.skip(message)
    if not (JS / "node_modules" / "@asyncapi" / "parser").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=JS,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return JS / "validate.mjs"


def _parse(script: Path, text: str) -> tuple[int, list[dict]]:
    result = subprocess.run(
        ["node", str(script), "-"], input=text, capture_output=True, text=True, timeout=120
    )
    diagnostics = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, diagnostics


@pytest.mark.parametrize(
    ("message_format", "as_json"), [("outbox", False), ("cloudevents", True)], ids=["yaml", "json"]
)
def test_the_official_parser_accepts_the_document(asyncapi_parser, message_format, as_json):
    document = asyncapi(typed_events, message_format=message_format)
    code, diagnostics = _parse(asyncapi_parser, dump(document, json_output=as_json))
    errors = [d for d in diagnostics if d["severity"] == 0]
    assert (code, errors) == (0, [])


def test_the_parser_check_fails_on_a_broken_document(asyncapi_parser):
    document = asyncapi(typed_events)
    document["operations"]["send_Ping"]["channel"] = {"$ref": "#/channels/nowhere"}
    code, diagnostics = _parse(asyncapi_parser, dump(document, json_output=True))
    assert code == 1
    assert any(d["severity"] == 0 for d in diagnostics)


def test_a_small_document_is_pinned_byte_for_byte():
    text = dump(asyncapi([OrderPlaced, OrderShipped], title="Orders"), json_output=False)
    if os.environ.get("MONGO_OUTBOX_UPDATE_PINNED") == "1":
        PINNED.write_text(text)
    assert text == PINNED.read_text()


def test_the_document_describes_channels_messages_and_headers():
    document = asyncapi(typed_events, message_format="cloudevents", cloudevents_source="urn:shop")
    assert document["asyncapi"] == "3.0.0"
    assert sorted(document["channels"]) == ["default", "orders"]
    orders = document["channels"]["orders"]
    assert orders["address"] == "orders"
    assert orders["bindings"]["googlepubsub"]["bindingVersion"] == "0.2.0"
    assert sorted(orders["messages"]) == ["OrderPlaced", "OrderShipped"]
    message = document["components"]["messages"]["OrderShipped"]
    headers = message["headers"]["properties"]
    assert headers["ce-type"]["const"] == "OrderShipped"
    assert headers["ce-source"]["const"] == "urn:shop"
    assert "outbox_event_type" not in headers
    assert "outbox_event_id" in message["headers"]["required"]
    assert message["payload"]["properties"]["to"] == {"$ref": "#/components/schemas/Address"}
    assert document["components"]["schemas"]["Address"]["required"] == ["street", "city"]
    assert message["bindings"]["googlepubsub"]["orderingKey"] == "shipment_key of the event"
    assert (
        "orderingKey" not in document["components"]["messages"]["Ping"]["bindings"]["googlepubsub"]
    )
    assert document["operations"]["send_Ping"]["action"] == "send"
    assert "$defs" not in json.dumps(document)


def test_nested_models_of_the_same_name_but_different_shapes_both_survive():
    sku_item = create_model("Item", sku=(str, ...))
    count_item = create_model("Item", count=(int, ...))
    a = event("A", topic="things")(create_model("A", item=(sku_item, ...)))
    b = event("B", topic="things")(create_model("B", item=(count_item, ...)))

    document = asyncapi([a, b])
    schemas = document["components"]["schemas"]
    assert sorted(schemas) == ["B.Item", "Item"]
    refs = {
        m: document["components"]["messages"][m]["payload"]["properties"]["item"]["$ref"]
        for m in ("A", "B")
    }
    assert refs == {"A": "#/components/schemas/Item", "B": "#/components/schemas/B.Item"}
    assert "count" in schemas["B.Item"]["properties"]


def test_yaml_and_json_dumps_hold_the_same_document():
    document = asyncapi(typed_events)
    assert yaml.safe_load(dump(document, json_output=False)) == document
    assert json.loads(dump(document, json_output=True)) == document


def test_bad_arguments_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="message format"):
        asyncapi(typed_events, message_format="avro")
    with pytest.raises(ConfigurationError, match="only to the cloudevents"):
        asyncapi(typed_events, cloudevents_source="urn:x")
    with pytest.raises(ConfigurationError, match="not declared"):
        asyncapi([BaseModel])
