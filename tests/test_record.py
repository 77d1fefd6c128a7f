"""The versioned record: one reader that migrates older records and skips (naming them) the
lines that are not valid records, wherever the store is read; NaN and infinite metrics; and
the committed leaderboards' stores. Hand-made records, no model."""

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from raghub import RunError
from raghub.cli import cli
from raghub.plugins.models.huggingface import HuggingFaceCausal
from raghub.record import SCHEMA_VERSION, Record
from raghub.records import append_record
from raghub.resolution import resolve_sweep

LEADERBOARDS = Path(__file__).resolve().parents[1] / "leaderboards"


def qa_record(method, f1, stderr=0.01, **fields):
    return {"task": "squad", "method": method, "retriever": None, "model": "m", "n_docs": 0,
            "settings": "", "corpus": None, "n_examples": 100, "metrics": {"f1": f1},
            "higher_is_better": {"f1": True}, "stderr": {"f1": stderr}, **fields}


def write_store(folder: Path, *records) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


# --------------------------------------------------------------------------- migration

#: a record as raghub wrote them before records had ids, samples logs, standard errors or a
#: schema version: with the absolute path of the task's YAML on the machine that ran it
OLD = {"task": "squad", "family": "qa", "method": "none", "retriever": None, "model": "m", "n_docs": 0,
       "settings": "", "corpus": None, "n_examples": 10, "metrics": {"f1": 0.25},
       "higher_is_better": {"f1": True}, "method_stats": {}, "hardware": {"dtype": "float32"},
       "started_at": "2026-11-23T20:52:07.366331+00:00", "finished_at": "2026-11-23T20:53:00+00:00",
       "config": {"task": {"task": "squad", "config": {"name": "squad", "version": 3,
                                                       "source": "/work/main/tasks/squad.yaml"}},
                  "corpus": {"label": None, "fingerprint": None}}}


def test_an_old_record_migrates_to_the_current_schema_without_its_machine_path():
    record = Record.from_dict(OLD)
    assert record.schema_version == SCHEMA_VERSION
    assert record.config["task"]["config"] == {"name": "squad", "version": 3}
    assert record.task_version == 3 and record.samples is None and record.stderr == {}
    assert re.fullmatch(r"20261123-205207-[0-9a-f]{6}", record.id)
    assert Record.from_dict(OLD).id == record.id  # the same old line gets the same id every time
    assert Record.from_dict(record.to_dict()) == record  # the current schema reads back as written


def test_an_old_record_without_an_id_is_found_by_samples_and_says_it_has_no_log(tmp_path):
    write_store(tmp_path, OLD)
    result = invoke("samples", "latest", "--results-dir", tmp_path)
    assert result.exit_code == 2 and "has no samples log" in result.output


def test_an_identical_run_stored_by_an_older_raghub_elsewhere_is_reused(host, tmp_path, monkeypatch):
    """The reuse key leaves out where the task's YAML lay: an old record made in another
    checkout is the same run."""
    results = tmp_path / "results"
    (resolved,) = resolve_sweep({"task": "wikitext2", "method": "none", "limit": 1, "results_dir": str(results)}, host)
    config = json.loads(json.dumps(resolved.config))
    config["task"]["config"]["source"] = "/another/checkout/tasks/wikitext2.yaml"
    write_store(results, {**OLD, "task": "wikitext2", "config": config, "metrics": {"bits_per_byte": 1.25}})
    monkeypatch.setattr(HuggingFaceCausal, "load", lambda *a, **k: pytest.fail("model loaded"))
    result = invoke("run", "--task", "wikitext2", "--method", "none", "--limit", 1, "--json",
                    "--results-dir", results)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"] == {"bits_per_byte": 1.25}
    assert "reusing the identical run" in result.stderr


def test_a_record_of_a_newer_schema_is_skipped_and_named(tmp_path):
    write_store(tmp_path, qa_record("none", 0.2), {**qa_record("new", 0.3), "schema_version": SCHEMA_VERSION + 1})
    result = invoke("leaderboard", "--results-dir", tmp_path)
    assert result.exit_code == 0 and "| none |" in result.stdout and "| new |" not in result.stdout
    assert f"line 2: skipped, not a record: schema_version {SCHEMA_VERSION + 1}" in result.stderr


# --------------------------------------------------------------------------- invalid records

WRONG = [("config", "a string"), ("task", 3), ("settings", 5), ("n_docs", "three"), ("n_examples", "100"),
         ("higher_is_better", ["f1"]), ("higher_is_better", {"f1": "yes"}), ("stderr", "small"),
         ("stderr", {"f1": "small"}), ("metrics", {"f1": 0.3, "by_type": ["bridge"]}),
         ("metrics", {"f1": 0.3, "by_type": {"bridge": 0.3}}), ("config", {"task": "squad"}),
         ("hardware", {"dtype": 16})]


@pytest.mark.parametrize("field, value", WRONG)
@pytest.mark.parametrize("command", [("leaderboard",), ("leaderboard", "--by-type"),
                                     ("plot", "--output", "plot.svg")])
def test_a_record_with_a_wrong_type_is_skipped_and_named(tmp_path, monkeypatch, command, field, value):
    monkeypatch.chdir(tmp_path)
    write_store(tmp_path / "results", qa_record("none", 0.2), {**qa_record("bad", 0.3), field: value},
                qa_record("incontext", 0.4))
    result = invoke(*command, "--results-dir", tmp_path / "results")
    assert result.exit_code == 0, result.output
    assert f"records.jsonl, line 2: skipped, not a record: '{field}" in result.stderr
    if command[0] == "leaderboard":
        assert "| none |" in result.stdout and "| incontext |" in result.stdout and "| bad |" not in result.stdout


def test_a_record_whose_config_is_not_a_mapping_does_not_stop_later_runs(host, tmp_path, monkeypatch):
    results = tmp_path / "results"
    (resolved,) = resolve_sweep({"task": "wikitext2", "method": "none", "limit": 1, "results_dir": str(results)}, host)
    stored = {**qa_record("none", 0.5), "task": "wikitext2", "config": json.loads(json.dumps(resolved.config)),
              "metrics": {"bits_per_byte": 1.25}, "schema_version": SCHEMA_VERSION, "id": "stored"}
    write_store(results, stored, {**stored, "id": "broken", "config": "a string"})
    monkeypatch.setattr(HuggingFaceCausal, "load", lambda *a, **k: pytest.fail("model loaded"))
    result = invoke("run", "--task", "wikitext2", "--method", "none", "--limit", 1, "--json", "--results-dir", results)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "stored"
    assert "records.jsonl, line 2: skipped, not a record: 'config'" in result.stderr


def test_a_run_whose_record_would_not_read_back_is_not_stored(tmp_path):
    record = Record(id="r", samples="samples/r.jsonl", task="t", method="m", n_examples=1,
                    metrics={"f1": 0.5, "by_type": ["a plugin's list"]})
    with pytest.raises(RunError, match=r"record is not valid \('metrics.by_type' must be"):
        append_record(tmp_path, record, [{"id": "1"}])
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- NaN and infinities

@pytest.mark.parametrize("odd", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_shown_and_never_bold(tmp_path, odd):
    # one order of rows in which a NaN made the sort rank 0.4 above 0.5
    write_store(tmp_path, qa_record("a", 0.2), qa_record("b", 0.4), qa_record("c", odd), qa_record("d", 0.5))
    table = invoke("leaderboard", "--results-dir", tmp_path).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert f"| {odd:.4f} ± 0.0100 |" in rows["c"] and "**" not in rows["c"]
    assert "| **0.5000 ± 0.0100** |" in rows["d"]  # beats 0.4 by more than their combined error
    assert sum("**" in row for row in rows.values()) == 1


# --------------------------------------------------------------------------- committed stores

COMMITTED_STORES = sorted(path.parent for path in LEADERBOARDS.rglob("records.jsonl"))
MACHINE_PATH = re.compile(r"(?:^|[\s=])/\w")


def strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("store", COMMITTED_STORES, ids=lambda store: str(store.relative_to(LEADERBOARDS.parent)))
def test_committed_records_are_current_without_machine_paths_and_match_their_samples_logs(store):
    lines = [json.loads(line) for line in (store / "records.jsonl").read_text().splitlines()]
    assert all(line.get("schema_version") == SCHEMA_VERSION for line in lines)
    assert [Record.from_dict(line).to_dict() for line in lines] == lines  # valid, and already migrated
    assert not [text for line in lines for text in strings(line) if MACHINE_PATH.search(text)]
    named = {line["samples"] for line in lines if line["samples"]}
    logs = {str(path.relative_to(store)) for path in (store / "samples").glob("*")} if (store / "samples").exists() else set()
    assert named == logs  # every record's log is there, and every log has its record
    assert all(name.endswith(".jsonl.gz") for name in logs)
