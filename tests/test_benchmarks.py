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


def test_the_random_shape_speed_benchmark_runs_and_raghub_agrees_with_the_plain_loop(capsys):
    """`speed.py --model-shape` (meant for a GPU) runs end to end on a tiny random OPT here,
    and its table's plain-loop rows give raghub's log-probs (bf16 or float32: within 1e-3)."""
    spec = importlib.util.spec_from_file_location("benchmark_speed", BENCHMARKS[0].with_name("speed.py"))
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    speed.main(["--model-shape", "opt-tiny", "--device", "cpu", "--windows", "1", "--k", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| none", "| ensemble"))]
    assert [(row[0], row[1]) for row in rows] == [("| none", "raghub"), ("| none", "plain loop"),
                                                  ("| ensemble", "raghub"), ("| ensemble", "plain loop")]
    for row in rows:
        largest = float(row[-1].split("(")[1].rstrip(") |"))
        assert largest < 1e-3
