"""Shared test settings: the datasets folder beside the checkout unless one is named, and a
fixture that registers in-process plugins for one test."""

import os
from pathlib import Path

import pytest

from raghub.plugin_manager import failed_plugins, load_plugins, pm, registry

os.environ.setdefault("RAGHUB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def add_plugin():
    """Registers in-process plugins (after the built-ins); afterwards unregisters them and
    forgets their failures."""
    load_plugins()
    names = []

    def add(plugin):
        names.append(f"test-plugin-{len(names)}")
        pm.register(plugin, names[-1])
        registry.cache_clear()
        return names[-1]

    yield add
    for name in names:
        pm.unregister(name=name)
        failed_plugins.pop(name, None)
    registry.cache_clear()
