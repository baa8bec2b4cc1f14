"""Pins the public surface of ``mongo_outbox``: names, docstrings, typing marker, error tree."""

from __future__ import annotations

import importlib
import importlib.resources
import inspect

import pytest

import mongo_outbox

EXPECTED_ALL = [
    "AsyncOutboxTransaction",
    "ConfigurationError",
    "ConnectError",
    "InMemoryPublisher",
    "Inbox",
    "LeaseLostError",
    "Message",
    "NotSentError",
    "OutboxError",
    "OutboxTransaction",
    "PermanentPublishError",
    "PoisonEventError",
    "PubSubPublisher",
    "PublishError",
    "Publisher",
    "Relay",
    "RelayConfig",
    "RelayStats",
    "TransientPublishError",
    "ValidationError",
    "__version__",
    "emit_in",
    "encode_payload",
    "ensure_indexes",
    "outbox_transaction",
    "run_in_outbox_transaction",
]


def test_all_is_pinned():
    assert mongo_outbox.__all__ == EXPECTED_ALL


def test_all_is_sorted_and_unique():
    assert mongo_outbox.__all__ == sorted(mongo_outbox.__all__)
    assert len(set(mongo_outbox.__all__)) == len(mongo_outbox.__all__)


def test_design_contract_names_are_public():
    for name in ("outbox_transaction", "run_in_outbox_transaction", "ensure_indexes"):
        assert name in mongo_outbox.__all__


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_is_importable(name):
    namespace: dict = {}
    exec(f"from mongo_outbox import {name}", namespace)
    assert namespace[name] is getattr(mongo_outbox, name)


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from mongo_outbox import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(EXPECTED_ALL)


def test_version():
    assert isinstance(mongo_outbox.__version__, str)
    assert mongo_outbox.__version__.count(".") >= 2
    from importlib.metadata import version

    assert version("mongo-outbox") == mongo_outbox.__version__


def _documented(obj) -> bool:
    doc = obj.__doc__  # not inspect.getdoc: that falls back to a base class's docstring
    if not doc or not doc.strip():
        return False
    # A dataclass without a docstring gets its signature as __doc__: that does not count.
    return not (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("))


@pytest.mark.parametrize(
    "name",
    [n for n in EXPECTED_ALL if callable(getattr(mongo_outbox, n))],
)
def test_public_classes_and_functions_have_docstrings(name):
    obj = getattr(mongo_outbox, name)
    assert _documented(obj), f"mongo_outbox.{name} has no docstring"


def test_the_package_has_a_docstring():
    assert _documented(mongo_outbox)


def test_py_typed_marker_is_shipped():
    marker = importlib.resources.files("mongo_outbox") / "py.typed"
    assert marker.is_file()


# -- exception tree --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        ("ValidationError", "OutboxError"),
        ("ValidationError", "ValueError"),
        ("PoisonEventError", "ValidationError"),
        ("PoisonEventError", "OutboxError"),
        ("PublishError", "OutboxError"),
        ("TransientPublishError", "PublishError"),
        ("NotSentError", "TransientPublishError"),
        ("PermanentPublishError", "PublishError"),
        ("ConfigurationError", "OutboxError"),
        ("ConfigurationError", "ValueError"),
        ("ConnectError", "OutboxError"),
        ("LeaseLostError", "OutboxError"),
        ("OutboxError", "Exception"),
    ],
)
def test_exception_tree(child, parent):
    builtin = {"ValueError": ValueError, "Exception": Exception}
    child_cls = getattr(mongo_outbox, child)
    parent_cls = builtin.get(parent) or getattr(mongo_outbox, parent)
    assert issubclass(child_cls, parent_cls)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("TransientPublishError", "PermanentPublishError"),
        ("PublishError", "ValidationError"),
        ("ConfigurationError", "ConnectError"),
        ("LeaseLostError", "PublishError"),
    ],
)
def test_sibling_errors_are_distinct(one, other):
    a, b = getattr(mongo_outbox, one), getattr(mongo_outbox, other)
    assert not issubclass(a, b)
    assert not issubclass(b, a)


def test_only_validation_and_configuration_errors_are_value_errors():
    for name in ("PublishError", "ConnectError", "LeaseLostError"):
        assert not issubclass(getattr(mongo_outbox, name), ValueError)


@pytest.mark.parametrize(
    "settings",
    [
        {"database": ""},
        {"database": "d", "batch_size": 0},
        {"database": "d", "max_attempts": 0},
        {"database": "d", "lease_ttl": 0},
        {"database": "d", "dead_key_policy": "drop"},
    ],
)
def test_bad_relay_settings_are_configuration_errors(settings):
    with pytest.raises(mongo_outbox.ConfigurationError):
        mongo_outbox.RelayConfig(**settings)


def test_errors_are_defined_in_one_module():
    errors = importlib.import_module("mongo_outbox._errors")
    for name in errors.__all__:
        assert getattr(mongo_outbox, name) is getattr(errors, name)
