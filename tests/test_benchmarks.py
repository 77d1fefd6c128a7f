"""The benchmarks are run by hand, so nothing else notices when one stops importing: each
`benchmarks/*.py` must at least import (its `main` runs only as a script)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_a_benchmark_imports(path):
    """Regression: speed.py imported BF16_CPU_FLAGS from where it no longer lives."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
