"""`raghub score`: predictions made elsewhere scored on the tiny two-question task of
tests/scripted.py and stored as a record and samples log, or refused in one line with nothing
written."""

import json

import pytest
from click.testing import CliRunner

from raghub.cache import fingerprint
from raghub.cli import cli
from raghub.records import read_records
from scripted import ROWS, write_task

GOLD = {row["_id"]: row["answer"] for row in ROWS}


def passage_id(title):
    """The id the hotpotqa reader gives the passage of `title` (see formats.make_passage)."""
    text = next(" ".join(sentences) for row in ROWS for t, sentences in row["context"] if t == title)
    return fingerprint(title, text)[:16]


@pytest.fixture
def task(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    return write_task(tmp_path)


def score(tmp_path, task, lines, *extra):
    predictions = tmp_path / "mine.jsonl"
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return CliRunner().invoke(cli, ["score", "--task", str(task), "--data-dir", str(tmp_path / "data"),
                                    "--results-dir", str(tmp_path / "results"), "--json",
                                    str(predictions), *extra])


def test_gold_answers_score_one_and_join_the_leaderboard(tmp_path, task):
    out = score(tmp_path, task, [{"id": i, "prediction": answer} for i, answer in GOLD.items()])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["metrics"]["em"] == record["metrics"]["f1"] == record["metrics"]["match"] == 1.0
    assert record["method"] == "mine" and record["stderr"]["em"] == 0.0
    assert [r.id for r in read_records(tmp_path / "results")] == [record["id"]]
    lines = [json.loads(line) for line in (tmp_path / "results" / record["samples"]).read_text().splitlines()]
    assert [(line["id"], line["prediction"], line["answers"]) for line in lines] == \
        [(i, answer, [answer]) for i, answer in GOLD.items()]
    board = CliRunner().invoke(cli, ["leaderboard", "--results-dir", str(tmp_path / "results")]).stdout
    assert "| mine |" in board


def test_empty_predictions_score_zero(tmp_path, task):
    out = score(tmp_path, task, [{"id": i, "prediction": ""} for i in GOLD], "--system", "silent")
    record = json.loads(out.stdout)
    assert record["metrics"]["em"] == record["metrics"]["f1"] == record["metrics"]["match"] == 0.0
    assert record["method"] == "silent"


def test_retrieved_passage_ids_give_recall_at_k(tmp_path, task):
    retrieved = {"q1": ["Alpha Film", "Bea Mann"], "q2": ["Einstein", "Ulm"]}  # q1: both gold; q2: neither
    out = score(tmp_path, task, [{"id": i, "prediction": "x", "retrieved": [passage_id(t) for t in retrieved[i]]}
                                 for i in GOLD])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["n_docs"] == 2 and record["metrics"]["recall@2"] == pytest.approx(0.5)
    assert record["config"]["corpus"]["fingerprint"] is not None


@pytest.mark.parametrize("lines, message", [
    ([{"id": "q1", "prediction": "Ulm"}, {"id": "q2", "prediction": "a"}, {"id": "q7", "prediction": "b"}],
     "1 id not among the task's questions (q7)"),
    ([{"id": "q1", "prediction": "Ulm"}], "1 question without a prediction (q2)"),
    ([{"id": "q1", "prediction": "Ulm"}, {"id": "q1", "prediction": "Ulm"}, {"id": "q2", "prediction": "a"}],
     "1 id given more than once (q1)"),
    ([{"id": "q1", "prediction": "Ulm", "retrieved": ["nope"]}, {"id": "q2", "prediction": "a", "retrieved": ["nope"]}],
     "1 passage id not in the task's corpus (nope)"),
    ([{"id": "q1", "prediction": "Ulm", "retrieved": []}, {"id": "q2", "prediction": "a"}],
     '"retrieved" given for 1 of 2 predictions'),
    ([{"id": "q1", "prediction": 3}], 'line 1 must be an object with a string "id" and "prediction"'),
])
def test_predictions_that_are_not_one_per_question_are_one_line_and_write_nothing(tmp_path, task, lines, message):
    out = score(tmp_path, task, lines)
    assert out.exit_code == 2 and message in out.output and len(out.output.splitlines()) == 1, out.output
    assert not (tmp_path / "results").exists()


def test_every_problem_is_counted_in_the_one_line(tmp_path, task):
    out = score(tmp_path, task, [{"id": "q1", "prediction": "a"}, {"id": "q1", "prediction": "b"},
                                 {"id": "x", "prediction": "c"}, {"id": "y", "prediction": "d"}])
    assert out.exit_code == 2 and len(out.output.splitlines()) == 1
    for part in ("1 id given more than once (q1)", "2 ids not among the task's questions (x, y)",
                 "1 question without a prediction (q2)", "nothing was scored"):
        assert part in out.output
