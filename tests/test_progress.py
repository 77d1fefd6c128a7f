"""What a run tells a person: how many examples it will run, and, from the first batch, the time
the rest will take (the bar's time left is that pace); and no third-party noise unless
`--verbose`."""

import os
import subprocess
import warnings

import pytest

from plugin_packages import RAGHUB
from raghub import pace
from raghub.pace import Pace, duration
from raghub.quiet import QUIET_ENVIRONMENT, quiet_third_party
from scripted import ScriptedBackend, ScriptedModel, scripted  # noqa: F401
from test_models import save_tiny_model


@pytest.mark.parametrize("seconds, words", [(0.42, "0.4 s"), (12.4, "12 s"), (200, "3 min 20 s"),
                                            (7500, "2 h 05 min")])
def test_a_duration_reads_as_words(seconds, words):
    assert duration(seconds) == words


def test_the_time_left_is_the_pace_so_far_from_the_first_batch_on(monkeypatch):
    """Regression: rich's estimate needs two advances within 30 s, so batches slower than that
    (a real model on a CPU) never showed a time left, and the first batch never counted."""
    now = [100.0]
    monkeypatch.setattr(pace.time, "perf_counter", lambda: now[0])
    run = Pace(total=10)
    assert run.remaining() == "?"
    now[0] += 60  # the first batch of 2 took a minute
    run.advance(2)
    assert run.remaining() == "4 min 00 s"


def run_scripted(scripted, *args):
    ScriptedBackend.model = ScriptedModel(lambda prompt: " Ulm\n")
    out = scripted.invoke("incontext", "--batch-size", 1, *args)
    assert out.exit_code == 0, out.output
    return out.stderr


def test_a_run_without_limit_says_how_many_examples_and_the_time_to_expect(scripted):
    said = run_scripted(scripted)
    assert "tiny · incontext: 2 examples to run, in 2 batch(es) of up to 1" in said
    assert "the first batch of 1 took" in said and "more for the other 1" in said


def test_a_run_with_a_limit_says_neither(scripted):
    said = run_scripted(scripted, "--limit", 2)
    assert "examples to run" not in said and "the first batch" not in said


# --- third-party noise -----------------------------------------------------------------------

def run_tiny_model(tmp_path, *flags):
    """`raghub run` of a closed-book QA question on a tiny random model folder, in a subprocess
    (the libraries read their settings when imported): its stderr."""
    save_tiny_model(tmp_path / "tiny", seed=0)
    env = {key: value for key, value in os.environ.items() if key not in QUIET_ENVIRONMENT}
    out = subprocess.run([str(RAGHUB), "run", "--task", "squad", "--method", "none", "--model", str(tmp_path / "tiny"),
                          "--limit", "1", "--results-dir", str(tmp_path / "results"), *flags],
                         env={**env, "RAGHUB_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_a_run_shows_no_loading_bar_or_deprecation_warning_unless_verbose(tmp_path):
    """Regression: every run printed transformers' `Loading weights` bar."""
    assert "Loading weights" not in run_tiny_model(tmp_path)
    assert "Loading weights" in run_tiny_model(tmp_path, "--verbose", "--force")


def test_quieting_silences_deprecation_warnings_and_keeps_what_the_user_exported(monkeypatch):
    for key in QUIET_ENVIRONMENT:
        monkeypatch.setenv(key, "exported")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        quiet_third_party(verbose=False)
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
    assert not warned and all(os.environ[key] == "exported" for key in QUIET_ENVIRONMENT)
