"""The core pieces on their own: cache, YAML errors, records and the leaderboard, bits per byte."""

import json
import math
import os
import time

import pytest

from raghub.cache import Cache, fingerprint, path_fingerprint
from raghub import Option, UsageError
from raghub.settings import read_yaml_mapping
from raghub.metrics import bits_per_byte, nats_per_token, perplexity
from raghub.leaderboard import leaderboard_markdown
from raghub.record import Record
from raghub.records import append_record, read_records


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_cache_builds_once_then_loads_and_rebuilds_a_corrupted_entry(tmp_path):
    cache, builds = Cache(tmp_path), []

    def build(folder):
        builds.append(1)
        (folder / "data.txt").write_text("value")

    load = lambda folder: (folder / "data.txt").read_text()
    assert cache.get_or_build("things", {"k": 1}, build, load) == "value"
    assert cache.get_or_build("things", {"k": 1}, build, load) == "value"
    assert len(builds) == 1
    (cache.entry_path("things", {"k": 1}) / "data.txt").write_text("corrupt")
    assert cache.get_or_build("things", {"k": 1}, build, load) == "value"
    assert len(builds) == 2


def test_a_file_rewritten_with_its_size_and_modification_time_kept_is_hashed_again(tmp_path, monkeypatch):
    """Regression: a file's cached sha256 was keyed by its path, size and mtime alone, so weights
    copied over a model file of the same size by a tool that keeps the source's mtime (`cp -p`,
    `rsync -a`, `tar x`) kept the old file's hash, and with it the old model's stored runs and
    cache entries."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"old weights")
    before, kept = path_fingerprint(weights), weights.stat()
    time.sleep(0.05)  # the copy comes later: past the clock tick file times are taken from
    weights.write_bytes(b"new weights")
    os.utime(weights, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert path_fingerprint(weights) != before


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: wikitext2\nmethod: [none\n")
    with pytest.raises(UsageError, match=r"bad.yaml, line 3"):
        read_yaml_mapping(path)


def test_option_conversion_errors_say_what_is_expected():
    assert Option(int, 1, "").convert("n", "3") == 3
    assert Option(bool, False, "").convert("flag", "yes") is True
    with pytest.raises(UsageError, match="--score-norm must be one of none, zscore"):
        Option(("none", "zscore"), "none", "").convert("score_norm", "minmax")


def test_bits_per_byte_nats_and_perplexity_by_hand():
    # 3 tokens each with p = 1/4 over a 4-byte text: 3·ln 4 nats = 6 bits over 4 bytes
    total = 3 * math.log(4)
    assert bits_per_byte(total, 4) == pytest.approx(1.5)
    assert nats_per_token(total, 3) == pytest.approx(math.log(4))
    assert perplexity(total, 3) == pytest.approx(4.0)


def _record(method, value, n_docs=0, retriever=None, stderr=None, **fields):
    return Record.from_dict({"task": "toy", "method": method, "retriever": retriever, "model": "m",
                             "n_docs": n_docs, "settings": "", "corpus": None, "n_examples": 2,
                             "metrics": {"ppl": value}, "higher_is_better": {"ppl": False},
                             "stderr": {"ppl": stderr}, **fields})


def test_records_round_trip_and_the_leaderboard_shows_each_rows_newest(tmp_path):
    append_record(tmp_path, _record("none", 20.0))
    append_record(tmp_path, _record("ensemble", 15.0, 4, "bm25"))
    append_record(tmp_path, _record("ensemble", 16.0, 4, "bm25"))  # newer run of the same row
    records = read_records(tmp_path)
    assert [r.metrics["ppl"] for r in records] == [20.0, 15.0, 16.0]
    table = leaderboard_markdown(records)
    assert "| ensemble |" in table and "15.0000" not in table  # the newest record replaces it
    assert "| 16.0000 |" in table and "| 20.0000 |" in table and "**" not in table  # no errors: no bold


def test_leaderboard_keeps_only_the_named_tasks():
    records = [_record("none", 2.0, task=task) for task in ("toy", "squad", "popqa")]
    table = leaderboard_markdown(records, tasks=("squad", "popqa"))
    assert "## squad" in table and "## popqa" in table and "## toy" not in table


def test_runs_on_different_numbers_of_examples_are_ranked_apart():
    records = [_record("none", 20.0, stderr=1.0), _record("ensemble", 15.0, 4, "bm25", stderr=1.0),
               _record("incontext", 10.0, 4, "bm25", stderr=1.0, n_examples=8)]
    table = leaderboard_markdown(records)
    assert "## toy, 8 examples" in table and "## toy, 2 examples" in table
    assert "**15.0000 ± 1.0000**" in table and "| 10.0000 ± 1.0000 |" in table  # alone: not bold


def test_a_torn_records_file_is_reported_by_line(tmp_path, capsys):
    (tmp_path / "records.jsonl").write_text(json.dumps(_record("none", 1.0).to_dict()) + "\n{broken\n")
    assert read_records(tmp_path) == [_record("none", 1.0)]
    assert "records.jsonl, line 2: skipped" in capsys.readouterr().err


def test_only_the_tasks_own_metrics_are_ranked():
    from raghub.provenance import ranked_metrics

    class QA:
        higher_is_better = {"em": True, "f1": True, "recall@k": True}

    metrics = {"em": 0.2, "f1": 0.3, "recall@3": 0.7, "n_questions": 100, "by_type": {}}
    assert ranked_metrics(QA, metrics) == {"em": True, "f1": True, "recall@3": True}
