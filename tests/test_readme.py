"""The README's Python samples marked ``<!-- runnable -->`` run as written.

They run in order in one namespace against the session's replica set, with the sample URI
replaced by the test's and the ``shop`` database by a unique one.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import textwrap
from pathlib import Path

from bson import Decimal128
from pymongo import MongoClient

from mongo_outbox.testing import EmulatorSubscription

README = Path(__file__).resolve().parent.parent / "README.md"
SAMPLE_URI = "mongodb://localhost:27017/?replicaSet=rs0"
# A marker line, then a fenced python block (indented as a whole inside a list item).
_RUNNABLE = re.compile(
    r"^[ \t]*<!-- runnable -->[ \t]*\n([ \t]*)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL
)


def runnable_blocks(text: str) -> list[str]:
    """The code of every block marked runnable, dedented."""
    return [textwrap.dedent(code) for _, code in _RUNNABLE.findall(text)]


def test_the_first_sample_is_marked_runnable():
    text = README.read_text()
    first = re.search(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert first is not None
    blocks = runnable_blocks(text)
    assert blocks, "no block is marked <!-- runnable -->"
    assert blocks[0] == first.group(1)


def test_readme_samples_run(mongodb_uri, outbox_database, mongo_client, pubsub_subscription):
    blocks = runnable_blocks(README.read_text())
    assert SAMPLE_URI in blocks[0]
    namespace: dict[str, object] = {"__name__": "readme"}
    try:
        for code in blocks:
            code = code.replace(SAMPLE_URI, mongodb_uri)
            code = re.sub(r"\bshop\b", outbox_database, code)
            exec(compile(code, str(README), "exec"), namespace)
    finally:
        client = namespace.get("client")
        if isinstance(client, MongoClient):
            client.close()
    db = mongo_client[outbox_database]
    assert db.orders.count_documents({}) == 4  # two sync samples, two async
    events = list(db.outbox.find({}, sort=[("_id", 1)]))
    assert [e["type"] for e in events] == ["OrderCreated"] * 4 + ["OrderPlaced"] * 2
    # The in-process relay sample published the four written before it; the typed ones came later.
    assert namespace["published"] == 4
    assert [e["status"] for e in events] == ["published"] * 4 + ["pending"] * 2
    # "Typed events": a model emitted with tx.emit and one with emit_in, with their writes.
    assert [(e["topic"], e["key"]) for e in events[4:]] == [("orders", "o-1"), ("orders", "o-2")]
    assert db.payments.count_documents({}) == 2
    assert db.orders.find_one({"_id": 7})["total"] == Decimal128("9.90")

    # Sample tests (the test kit's) run with the fixtures they name, on a database of their own,
    # each with a subscription of its own (as pytest would give them).
    kit_database = f"{outbox_database}_kit"
    project = pubsub_subscription.topic_path.split("/")[1]
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert tests
    try:
        for test in tests:
            names = inspect.signature(test).parameters
            with contextlib.ExitStack() as stack:
                fixtures = {"mongo_client": mongo_client, "outbox_database": kit_database}
                if "pubsub_subscription" in names:
                    subscription = EmulatorSubscription(project)
                    stack.callback(subscription.close)
                    fixtures["pubsub_subscription"] = subscription
                test(**{name: fixtures[name] for name in names})
    finally:
        mongo_client.drop_database(kit_database)
