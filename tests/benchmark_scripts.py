"""The scripts in `benchmarks/`, which are not a package: found and imported by name."""

import importlib.util
from pathlib import Path

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def benchmark(name: str):
    """The benchmark script `name`.py, imported."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS[0].with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
