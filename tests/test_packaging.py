"""The version is defined once and agrees with the installed metadata and the changelog."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import mongo_outbox

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_metadata_carries_the_package_version():
    # An editable install records the version when it is installed: reinstall after a bump.
    assert mongo_outbox.__version__ == importlib.metadata.version("mongo-outbox")


def test_the_changelog_has_a_section_for_the_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    version = re.escape(mongo_outbox.__version__)
    assert re.search(rf"^## \[{version}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.MULTILINE), (
        f"CHANGELOG.md has no '## [{mongo_outbox.__version__}] - YYYY-MM-DD' section"
    )
    assert re.search(rf"^\[{version}\]: ", changelog, re.MULTILINE), "no link for the version"


def test_the_version_is_written_only_in_the_package():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(r"^version\s*=", pyproject, re.MULTILINE)
    assert re.search(r'^dynamic = \[[^\]]*"version"', pyproject, re.MULTILINE)
    assert re.search(r'^path = "mongo_outbox/__init__.py"$', pyproject, re.MULTILINE)
