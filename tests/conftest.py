"""Shared test settings: the datasets folder beside the checkout unless one is named, and
fixtures for a test's own plugin host, in which it may register in-process plugins."""

import os
from pathlib import Path

import pytest

from raghub.plugin_manager import PluginHost

os.environ.setdefault("RAGHUB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def host(monkeypatch):
    """A plugin host of this test's own, which the CLI invoked in process uses too."""
    own = PluginHost()
    monkeypatch.setattr("raghub.cli.PluginHost", lambda: own)
    return own


@pytest.fixture
def add_plugin(host):
    """Registers in-process plugins in the test's host, after the built-ins; returns each one's name."""
    host.load()
    names = []

    def add(plugin):
        names.append(f"test-plugin-{len(names)}")
        host.register(plugin, names[-1])
        return names[-1]

    return add
