"""What a run tells a person: how many examples it will run, and, from the first batch, the time
the rest will take (the bar's time left is that pace); a bar that moves within a batch as the
model reports its work; and no third-party noise unless `--verbose`."""

import itertools
import os
import subprocess
import warnings

import pytest
from rich.progress import Progress

from plugin_packages import RAGHUB
from raghub import ModelProgress, pace
from raghub.pace import Pace, duration
from raghub.plugins.models.huggingface import HuggingFaceCausal, length_buckets
from raghub.progress import RunProgress, run_progress
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
    run.done = 2
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


# --- the bar within a batch -----------------------------------------------------------------

def bar_state(run: RunProgress) -> tuple[float, str, str]:
    """The bar's (examples completed, time left, text)."""
    [task] = run.bar.tasks
    return task.completed, task.fields["remaining"], task.fields["work"]


def test_the_bar_advances_within_a_batch_by_the_share_of_its_model_call_finished():
    """Regression: the bar moved once per batch, frozen for a whole batch of a slow model."""
    with run_progress("t · m", 0, [8, 8], 8) as run:
        for batch in range(2):
            with run.batch():
                call = ModelProgress(40)  # e.g. 8 windows x 5 passages scored in one call
                seen = []
                for _ in range(40):
                    call.advance(1)
                    seen.append(bar_state(run)[0] - 8 * batch)
            assert seen == pytest.approx([8 * n / 40 for n in range(1, 41)])
        assert bar_state(run)[0] == 16
        assert bar_state(run)[2] == "batch 2/2 · 40 of 40 sequences"
    assert ModelProgress(3).run is None  # outside a batch nothing listens


def test_a_resumed_run_starts_the_bar_at_the_examples_found_finished():
    with run_progress("t · m", 5, [4], 4) as run:
        assert bar_state(run)[0] == 5
        with run.batch():
            ModelProgress(2).advance(1)
            assert bar_state(run)[0] == 7
        assert run.bar.tasks[0].total == 9


def test_a_batch_of_several_model_calls_counts_the_work_in_the_text_and_moves_the_bar_per_batch():
    """The share of a batch that makes several calls is not known ahead: no invented fraction."""
    with run_progress("t · m", 0, [2, 2, 2], 2) as run:
        with run.batch():
            ModelProgress(2).advance(2)  # one call so far: its share is the batch's
            assert bar_state(run)[0] == 2
            second = ModelProgress(1)  # a second call: the bar holds, the text counts
            assert bar_state(run)[2] == "batch 1/3 · call 2 · 0 of 1 sequences"
            second.advance(1)
            assert bar_state(run)[0] == 2
        with run.batch():
            ModelProgress(4).advance(3)
            assert bar_state(run)[0] == 2  # batches make several calls: this one's share is unknown
            assert bar_state(run)[2] == "batch 2/3 · 3 of 4 sequences"
        assert bar_state(run)[0] == 4


def test_the_time_left_counts_the_share_of_a_batch_finished(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(pace.time, "perf_counter", lambda: now[0])
    with run_progress("t · m", 0, [4, 4], 4) as run:
        with run.batch():
            call = ModelProgress(10)
            now[0] += 60
            call.advance(5)  # half the first batch (2 examples) in a minute: 6 to go at that pace
            assert bar_state(run)[1] == "3 min 00 s"


class ReportingModel(ScriptedModel):
    """Reports each prompt to the run's bar as it answers it, as a backend working in parts does."""

    def generate_line(self, prompts, max_new_tokens):
        progress = ModelProgress(len(prompts))
        generations = []
        for prompt in prompts:
            generations.append(self.generation(prompt, max_new_tokens, one_line=True))
            progress.advance(1)
        return generations


def test_a_run_moves_its_bar_as_the_model_reports_and_writes_the_same_samples(scripted, monkeypatch):
    moves, update = [], Progress.update

    def recorded(self, task, **fields):
        moves.extend([fields["completed"]] if "completed" in fields else [])
        return update(self, task, **fields)

    monkeypatch.setattr(Progress, "update", recorded)
    ScriptedBackend.model = ReportingModel(lambda prompt: " Ulm\n")
    _, reported = scripted.run("incontext", "--batch-size", 2)
    assert moves[:2] == [1, 2]  # the first of the batch's two questions answered, then the second
    ScriptedBackend.model = ScriptedModel(lambda prompt: " Ulm\n")
    _, silent = scripted.run("incontext", "--batch-size", 2, "--force")
    assert reported == silent


def test_the_transformers_backend_reports_each_of_its_batches_and_returns_the_same(tmp_path, monkeypatch):
    """Reporting changes neither what a call returns nor how it batches (`length_buckets`)."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    save_tiny_model(tmp_path / "tiny", seed=0)
    model = HuggingFaceCausal(token_budget=8).load(str(tmp_path / "tiny"), "cpu", "float32", 2)
    sequences = [model.encode(" ".join(["hello", "world"] * n)) for n in (1, 2, 3, 2)]
    prompts = ["hello world", "hello", "world hello world"]
    alone = model.sequence_logprobs(sequences, [1] * 4), model.generate_line(prompts, 2)
    moves = []
    monkeypatch.setattr(RunProgress, "_move_to", lambda self, done: moves.append(done))
    with run_progress("t · m", 0, [4, 3], 4) as run:
        with run.batch():
            scored = model.sequence_logprobs(sequences, [1] * 4)
        with run.batch():
            generated = model.generate_line(prompts, 2)
    shares = [list(itertools.accumulate(len(bucket) / len(lengths) for bucket in length_buckets(lengths, 8)))
              for lengths in ([len(s) for s in sequences], [len(model.encode(p)) + 2 for p in prompts])]
    assert all(len(share) > 1 for share in shares)
    assert moves == pytest.approx([*(4 * f for f in shares[0]), 4, *(3 * f for f in shares[1]), 3])
    assert [t.tolist() for t in scored] == [t.tolist() for t in alone[0]]
    assert generated == alone[1]
