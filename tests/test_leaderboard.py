"""Leaderboard identity (task config and corpus fingerprints), honest bolding, and reusing an
identical stored run: hand-made records, no model."""

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from raghub.cache import fingerprint
from raghub.cli import cli
from raghub.plugins.models.huggingface import HuggingFaceCausal
from raghub.leaderboard import clear_winner, leaderboard_markdown, task_config_fingerprint
from raghub.record import Record
from raghub.records import append_record
from raghub.resolution import resolve_sweep
from scripted import ROWS, ScriptedBackend, ScriptedModel, scripted  # noqa: F401


def record(method, f1, stderr=None, stride=0, corpus_fp=None, source="/a/tasks/squad.yaml", **extra):
    """A QA record as an older raghub wrote it, with where its task's YAML lay; `stride` stands
    for any task option that changes the task's configuration."""
    return Record.from_dict({
        "task": "squad", "method": method, "retriever": None, "model": "m", "n_docs": 0, "settings": "",
        "corpus": None, "n_examples": 100, "metrics": {"f1": f1, "n_questions": 100},
        "higher_is_better": {"f1": True}, "stderr": {"f1": stderr},
        "config": {"task": {"task": "squad", "config": {"name": "squad", "source": source}, "stride": stride},
                   "corpus": {"label": None, "fingerprint": corpus_fp}}, **extra})


@pytest.mark.parametrize("cells, higher, winner", [
    ([(0.50, 0.01), (0.40, 0.01)], True, 0),            # 0.10 apart > sqrt(2) * 0.01
    ([(0.50, 0.05), (0.45, 0.05)], True, None),         # 0.05 apart < 0.0707: within noise
    ([(20.0, 1.0), (15.0, 1.0), (30.0, 1.0)], False, 1),  # lower is better
    ([(0.50, 0.01), (0.40, None)], True, None),         # the runner-up has no standard error
    ([(0.50, None), (0.40, None)], True, None),         # none has one: never bold
    ([(0.50, 0.01)], True, None),                       # a single row
    ([(0.50, 0.01), (None, None)], True, None),         # one value only
])
def test_bold_only_when_the_best_beats_the_runner_up_by_their_combined_error(cells, higher, winner):
    assert clear_winner(cells, higher) == winner


def test_values_show_their_standard_error_and_counts_are_never_bold():
    table = leaderboard_markdown([record("none", 0.20, 0.01), record("incontext", 0.40, 0.02)])
    assert "| **0.4000 ± 0.0200** |" in table and "| 0.2000 ± 0.0100 |" in table
    assert "n_questions" not in table and "combined standard error" in table
    by_type = leaderboard_markdown(
        [record(m, v, 0.01, metrics={"f1": v, "by_type": {"bridge": {"f1": v, "count": c}}})
         for m, v, c in (("none", 0.2, 10), ("incontext", 0.4, 50))], by_type=True)
    bridge_table = by_type.split("### squad — bridge")[1]
    assert "**" not in bridge_table  # per-type values have no standard errors; counts never bold


def test_differently_configured_tasks_of_one_name_are_separate_labelled_rows():
    plain, strided = record("none", 0.20), record("none", 0.30, stride=4)
    table = leaderboard_markdown([plain, strided])
    assert table.count("| none |") == 2 and "| task config |" in table
    for row in (plain, strided):
        assert f"| {task_config_fingerprint(row)} |" in table
    assert task_config_fingerprint(plain) != task_config_fingerprint(strided)


def test_where_the_task_file_lies_does_not_split_a_row_but_another_corpus_does():
    here, there = record("none", 0.20), record("none", 0.30, source="/b/tasks/squad.yaml")
    table = leaderboard_markdown([here, there])
    assert table.count("| none |") == 1 and "0.3000" in table and "task config" not in table
    other_corpus = leaderboard_markdown([record("none", 0.20, corpus_fp="c1"),
                                         record("none", 0.30, corpus_fp="c2")])
    assert other_corpus.count("| none |") == 2


def with_data(stored, data_sha256):
    """`stored` as a record whose task configuration names its data files' content."""
    stored.config["task"]["data_sha256"] = data_sha256
    return stored


def test_a_record_naming_its_data_shares_the_row_of_one_stored_before_records_did():
    """Regression: once the data files' content was in the task's configuration, a row re-run
    beside older records became a row of its own with a `task config` column, as if its task
    were another."""
    table = leaderboard_markdown([record("none", 0.20), with_data(record("none", 0.30), {"file": "abc"}),
                                  record("incontext", 0.40)])
    assert table.count("| none |") == 1 and "0.3000" in table
    assert "task config" not in table and "| data |" not in table


def test_rows_on_other_data_files_get_a_data_column():
    table = leaderboard_markdown([with_data(record("none", 0.20), {"file": "abc"}),
                                  with_data(record("incontext", 0.30), {"file": "def"})])
    assert "| data |" in table and "task config" not in table


RUN = ("run", "--task", "wikitext2", "--method", "none", "--limit", "1")


@pytest.fixture
def stored_identical_run(host, tmp_path):
    """A results folder holding a hand-made record whose config is exactly what RUN resolves to."""
    results = tmp_path / "results"
    (resolved,) = resolve_sweep({"task": "wikitext2", "method": "none", "limit": 1,
                                 "results_dir": str(results)}, host)
    append_record(results, record("none", 0.5, task="wikitext2", config=resolved.config,
                                  metrics={"bits_per_byte": 1.25}, finished_at="yesterday"))
    assert fingerprint(json.loads(json.dumps(resolved.config))) == fingerprint(resolved.config)
    return results


def test_an_identical_rerun_reuses_the_stored_record_without_loading_the_model(stored_identical_run,
                                                                                 monkeypatch):
    monkeypatch.setattr(HuggingFaceCausal, "load", lambda *a, **k: pytest.fail("model loaded"))
    result = CliRunner().invoke(cli, [*RUN, "--json", "--results-dir", str(stored_identical_run)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"] == {"bits_per_byte": 1.25}
    assert "reusing the identical run" in result.stderr and "--force" in result.stderr
    assert len((stored_identical_run / "records.jsonl").read_text().splitlines()) == 1


def test_a_run_after_raghub_s_own_code_changed_is_not_the_stored_one(stored_identical_run, monkeypatch):
    """Regression: a stored run was recognised by its plugins' code but not raghub's own, so
    after a change to the core (a metric, a prompt template, the retrieval) the same command
    was handed the record the old code computed, exit 0."""
    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(HuggingFaceCausal, "load", load)
    monkeypatch.setattr("raghub.resolution.core_identity", lambda: {"source": "edited"})
    result = CliRunner().invoke(cli, [*RUN, "--results-dir", str(stored_identical_run)])
    assert isinstance(result.exception, Loaded)


def test_force_runs_an_identical_run_again(stored_identical_run, monkeypatch):
    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(HuggingFaceCausal, "load", load)  # the embedded model's backend inherits it
    result = CliRunner().invoke(cli, [*RUN, "--force", "--results-dir", str(stored_identical_run)])
    assert isinstance(result.exception, Loaded)


def test_a_run_after_its_task_s_data_file_changed_is_not_the_stored_one(scripted):
    """Regression: the stored run was recognised by the task's YAML alone, so after its data
    file changed (here one gold answer, not the passages) the old record came back, exit 0."""
    ScriptedBackend.model = ScriptedModel(lambda prompt: "Ulm")
    before, _ = scripted.run("incontext")
    rows = json.loads(json.dumps(ROWS))
    rows[0]["answer"] = "Danube"
    (scripted.folder / "data" / "tiny" / "tiny.json").write_text(json.dumps(rows))
    after, _ = scripted.run("incontext")
    assert after["id"] != before["id"] and after["metrics"]["em"] == before["metrics"]["em"] - 0.5
    assert after["config"]["task"] != before["config"]["task"]


def test_runs_judged_by_different_judges_get_a_judge_column():
    """Regression: judged accuracies from two judge models were ranked in one column without a
    word of which judge gave which."""
    def judged(method, accuracy, judge_model):
        plain = record(method, 0.2)
        return replace(plain, metrics={**plain.metrics, "judge_correctness": accuracy},
                       higher_is_better={**plain.higher_is_better, "judge_correctness": True},
                       config={**plain.config, "judge": {"name": "correctness", "model_name": judge_model,
                                                         "model_fingerprint": judge_model, "repeats": 1}})
    table = leaderboard_markdown([judged("none", 0.3, "small-judge"), judged("incontext", 0.6, "big-judge")])
    assert "| judge |" in table and "small-judge" in table and "big-judge" in table
    assert "| judge |" not in leaderboard_markdown([judged("none", 0.3, "j"), judged("incontext", 0.6, "j")])


def test_runs_in_different_dtypes_are_separate_rows_with_a_dtype_column():
    bf16, fp32 = (record("none", f1, hardware={"dtype": dtype}) for f1, dtype in ((0.20, "bfloat16"), (0.30, "float32")))
    table = leaderboard_markdown([bf16, fp32])
    assert table.count("| none |") == 2 and "| dtype |" in table
    assert "| bfloat16 | 0.2000 |" in table and "| float32 | 0.3000 |" in table
    assert "dtype" not in leaderboard_markdown([record("none", 0.20, hardware={"dtype": "float32"})])
