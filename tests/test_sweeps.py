"""Sweeps: comma lists (or YAML lists) of tasks, methods and n_docs run every combination, all
validated before any model loads, each model loaded once."""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from raghub.cli import cli
from raghub.errors import UsageError
from raghub.plugins.models.huggingface import HuggingFaceCausal
from raghub.resolution import resolve_sweep

DATA = Path(os.environ["RAGHUB_DATA_DIR"])  # set by conftest.py


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_every_combination_is_resolved_and_a_closed_book_method_runs_once(host, tmp_path):
    runs = resolve_sweep({"task": "squad,hotpotqa", "method": "none,ensemble", "n_docs": "2,4",
                          "results_dir": str(tmp_path)}, host)
    assert [(r.task.name, r.method_class.name, r.n_docs) for r in runs] == [
        ("squad", "none", 0), ("squad", "ensemble", 2), ("squad", "ensemble", 4),
        ("hotpotqa", "none", 0), ("hotpotqa", "ensemble", 2), ("hotpotqa", "ensemble", 4)]
    assert runs[1].task is runs[2].task  # one task object per task: its data is read once


def test_a_config_file_may_list_the_swept_values(host, tmp_path):
    runs = resolve_sweep({"task": "wikitext2", "method": ["none", "incontext"], "n_docs": [1, 2]}, host)
    assert [(r.method_class.name, r.n_docs) for r in runs] == [("none", 0), ("incontext", 1), ("incontext", 2)]
    config = tmp_path / "sweep.yaml"
    config.write_text("task: wikitext2\nmethod: [none, ensembel]\n")
    result = invoke("run", "--config", str(config), "--results-dir", str(tmp_path / "results"))
    assert result.exit_code == 2 and "unknown method 'ensembel'" in result.output


@pytest.mark.parametrize("args, message", [
    (["--method", "none,ensemble", "--n-docs", "0,2"], "--n-docs must be a positive integer for method 'ensemble', not 0"),
    (["--method", "none,ensembel"], "unknown method 'ensembel'"),
    (["--method", "none", "--task", "wikitext2,squad", "--stride", "4"], "--stride is not an option of the selected"),
    (["--method", "none", "--task", "wikitext2,"], "--task 'wikitext2,': the list has an empty name"),
    (["--method", "none,,ensemble"], "--method 'none,,ensemble': the list has an empty name"),
    (["--method", "ensemble", "--n-docs", "2, "], "--n-docs '2, ': the list has an empty value"),
])
def test_a_bad_combination_fails_before_any_model_loads(tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(HuggingFaceCausal, "load", lambda *a, **k: pytest.fail("model loaded"))
    result = invoke("run", "--task", "wikitext2", *args, "--limit", "1", "--results-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output and not (tmp_path / "records.jsonl").exists()


def test_a_broken_data_file_of_a_later_task_stops_the_sweep_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(HuggingFaceCausal, "load", lambda *a, **k: pytest.fail("model loaded"))
    shutil.copytree(DATA / "popqa", tmp_path / "data" / "popqa")
    (tmp_path / "data" / "squad").mkdir()
    (tmp_path / "data" / "squad" / "dev-v1.1.rebuilt-from-explorer-html.json").write_text('{"data": [{"ti')
    result = invoke("run", "--task", "popqa,squad", "--method", "none", "--limit", "1",
                    "--data-dir", str(tmp_path / "data"), "--results-dir", str(tmp_path / "results"))
    assert result.exit_code == 2, result.output
    assert "dev-v1.1.rebuilt-from-explorer-html.json, line 1: not JSON" in result.output
    assert not (tmp_path / "results").exists()


def test_a_config_list_with_an_empty_entry_is_refused(host):
    with pytest.raises(UsageError, match=r"--task \['wikitext2', None\]: the list has an empty name"):
        resolve_sweep({"task": ["wikitext2", None], "method": "none"}, host)


def test_n_docs_is_said_to_be_ignored_only_when_no_method_retrieves(host, capsys):
    resolve_sweep({"task": "wikitext2", "method": "none", "n_docs": "2"}, host)
    assert "--n-docs ignored" in capsys.readouterr().err
    resolve_sweep({"task": "wikitext2", "method": "none,ensemble", "n_docs": "2"}, host)
    assert "ignored" not in capsys.readouterr().err


@pytest.mark.real_model
def test_a_sweep_loads_the_model_once_and_matches_the_single_runs(tmp_path, monkeypatch):
    loads = []
    real_load = HuggingFaceCausal.load

    def counting_load(self, *args, **kwargs):
        loads.append(args)
        return real_load(self, *args, **kwargs)

    monkeypatch.setattr(HuggingFaceCausal, "load", counting_load)
    common = ("--task", "wikitext2", "--limit", "1", "--json")
    sweep = invoke("run", *common, "--method", "none,incontext", "--n-docs", "1",
                   "--results-dir", str(tmp_path / "sweep"))
    assert sweep.exit_code == 0, sweep.output
    assert len(loads) == 1
    swept = [json.loads(line) for line in sweep.stdout.splitlines()]
    assert [(r["method"], r["n_docs"], r["task_version"]) for r in swept] == [("none", 0, 1), ("incontext", 1, 1)]
    for method, swept_record in zip(("none", "incontext"), swept):
        single = invoke("run", *common, "--method", method, "--n-docs", "1",
                        "--results-dir", str(tmp_path / method))
        assert json.loads(single.stdout)["metrics"] == pytest.approx(swept_record["metrics"])
