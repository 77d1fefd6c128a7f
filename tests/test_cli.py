"""The CLI end to end: bad input, every hookspec, a third-party plugin, a real run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from raghub.cli import cli
from raghub.hookspecs import hookimpl
from raghub import Example, Field, Method, Passage, Retriever, Task, allocator

from bad_input import assert_one_line_exit_2, model_never_loads  # noqa: F401 (a fixture)

HERE = Path(__file__).parent
RAGHUB = Path(sys.executable).with_name("raghub")


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("args, message", [
    (["--task", "wikitext3", "--method", "none"], "unknown task 'wikitext3'; did you mean wikitext103, wikitext2"),
    (["--task", "wikitext2", "--method", "ensembel"], "unknown method 'ensembel'; did you mean ensemble"),
    (["--task", "wikitext2", "--method", "ensemble", "--retriever", "bm26"], "unknown retriever 'bm26'"),
    (["--task", "wikitext2", "--method", "ensemble", "--n-docs", "-1"], "--n-docs must be at least 0, not -1"),
    (["--task", "wikitext2", "--method", "ensemble", "--n-docs", "two"], "--n-docs must be an int, not 'two'"),
    (["--task", "wikitext2", "--method", "ensemble", "--n-docs", "0"], "--n-docs must be a positive integer"),
    (["--task", "wikitext2", "--method", "none", "--combine"], "--combine is not an option of the selected"),
    (["--task", "wikitext2", "--method", "none", "--dtype", "float64"],
     "--dtype must be one of auto, float32, bfloat16, float16, not 'float64'"),
    (["--config", "."], "cannot read .: Is a directory"),
    (["--task", "wikitext2"], "--method is required (on the command line or in --config)"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, model_never_loads, args, message):
    result = invoke("run", *args, "--results-dir", str(tmp_path / "results"))
    assert_one_line_exit_2(result, message, tmp_path / "results")


def test_a_model_that_cannot_be_found_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail at once, no hub retries
    result = invoke("run", "--task", "wikitext2", "--method", "none", "--model", "no/such-model-here",
                    "--results-dir", str(tmp_path / "results"))
    assert_one_line_exit_2(result, "model 'no/such-model-here' cannot be loaded", tmp_path / "results")


@pytest.mark.parametrize("args, message", [
    (["--task", "wikitext2", "--method", "ensemble", "--temperature", "0"], "--temperature must be above 0, not 0.0"),
    (["--task", "wikitext2", "--method", "ensemble", "--retriever", "bm25", "--b", "1.5"],
     "--b must be at most 1, not 1.5"),
    (["--task", "squad", "--method", "parametric", "--lora-rank", "0"], "--lora-rank must be at least 1, not 0"),
    (["--task", "wikitext2", "--method", "none", "--stride", "-4"], "--stride must be at least 0, not -4"),
])
def test_an_option_out_of_range_fails_before_the_model_loads(tmp_path, model_never_loads, args, message):
    result = invoke("run", *args, "--results-dir", str(tmp_path / "results"))
    assert_one_line_exit_2(result, message, tmp_path / "results")


@pytest.mark.parametrize("flag, value_type", [("--limit", "INTEGER"), ("--n-docs", "INTEGER"),
                                              ("--temperature", "FLOAT"), ("--model", "TEXT")])
def test_run_help_shows_the_type_of_each_option_value(flag, value_type):
    shown = invoke("run", "--help")
    assert shown.exit_code == 0
    assert f"{flag} {value_type} " in shown.output


def test_malformed_config_names_file_and_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: wikitext2\nmethod: none\nlimit: [8\n")
    result = invoke("run", "--config", str(config), "--results-dir", str(tmp_path / "results"))
    assert_one_line_exit_2(result, f"malformed YAML in {config}, line 4", tmp_path / "results")


# --- every hookspec, through an in-process plugin -------------------------------------------

class EchoTask(Task):
    """Three one-word examples; an example's score is 1 when the method returns its word."""

    family = "echo"
    higher_is_better = {"accuracy": True}
    definition_schema = {"words": Field(list, required=True)}

    def examples(self, model, limit):
        words = self.config["words"][:limit]
        return [Example(id=word, query=word) for word in words]

    def corpus(self):
        return [Passage(id=w, text=w) for w in self.config["words"]], "the words themselves"

    def evaluate(self, method, examples, retrieved):
        answers = method.answer(examples, retrieved)
        return [{"correct": float(a == e.id)} for a, e in zip(answers, examples)]

    def aggregate(self, stats):
        return {"accuracy": sum(s["correct"] for s in stats) / len(stats)}


class Copy(Method):
    name = "copy"

    def answer(self, questions, retrieved):
        return [hits[0].passage.text if hits else "" for hits in retrieved]


class Exact(Retriever):
    name = "exact"

    def index(self, passages, corpus_fingerprint):
        self.texts = [p.text for p in passages]

    def search(self, queries, k):
        return [[(self.texts.index(q), 1.0)][:k] for q in queries]


class EchoPlugin:
    @hookimpl
    def register_task_families(self, register):
        register(EchoTask)

    @hookimpl
    def register_tasks(self, register):
        register({"name": "echo3", "family": "echo", "words": ["alpha", "beta", "gamma"]})

    @hookimpl
    def register_methods(self, register):
        register(Copy)

    @hookimpl
    def register_retrievers(self, register):
        register(Exact)

    @hookimpl
    def register_commands(self, cli):
        pass  # exercised by the third-party package test below


@pytest.fixture
def echo_plugin(add_plugin):
    add_plugin(EchoPlugin())


def test_each_registration_hook_reaches_the_registry(echo_plugin, host):
    found = host.registry
    assert found.task_families["echo"] is EchoTask
    assert found.tasks["echo3"]["words"] == ["alpha", "beta", "gamma"]
    assert found.methods["copy"] is Copy and found.retrievers["exact"] is Exact
    assert found.origins[("method", "copy")] == "registered at run time"


@pytest.mark.real_model
def test_a_plugin_task_method_and_retriever_run_and_reach_the_leaderboard(echo_plugin, tmp_path):
    results = str(tmp_path / "results")
    result = invoke("run", "--task", "echo3", "--method", "copy", "--retriever", "exact",
                    "--n-docs", "1", "--limit", "2", "--json", "--results-dir", results)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["metrics"] == {"accuracy": 1.0} and record["n_examples"] == 2
    assert record["corpus"] == "the words themselves"
    board = invoke("leaderboard", "--results-dir", results)
    assert "| copy |" in board.output and "| 1.0000 |" in board.output


def test_a_misspelled_hook_implementation_fails_loudly(host, capsys):
    class Misspelled:
        @hookimpl
        def register_augmentors(self, register):
            pass

    host.register(Misspelled(), "misspelled")
    assert host.failed["misspelled"].startswith("register_augmentors is not a raghub hook")
    assert host.plugin("misspelled") is None
    assert "plugin 'misspelled' is skipped" in capsys.readouterr().err


# --- a real third-party package, installed and discovered through its entry point -----------

@pytest.fixture(scope="module")
def third_party_env(tmp_path_factory):
    """The environment of a subprocess that sees tests/third_party_plugin installed, and a
    second broken plugin whose import raises."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(HERE / "third_party_plugin", source)  # the build leaves files beside it
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    broken = target / "raghub_broken-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: raghub-broken\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[raghub]\nbroken = raghub_broken_module\n")
    (target / "raghub_broken_module.py").write_text("raise RuntimeError('this plugin is broken')\n")
    return {**os.environ, "PYTHONPATH": str(target)}


def test_third_party_plugin_is_listed_and_a_broken_one_is_named(third_party_env):
    out = subprocess.run([str(RAGHUB), "plugins", "--json"], env=third_party_env,
                         capture_output=True, text=True, check=True)
    listing = json.loads(out.stdout)
    uniform = next(p for p in listing["plugins"] if p["name"] == "uniform")
    assert uniform["origin"] == "raghub-uniform 0.1.0"
    assert uniform["hooks"] == ["register_methods", "register_rerankers", "register_retrievers", "register_tasks"]
    assert any(p["origin"] == "built-in" for p in listing["plugins"])
    assert "this plugin is broken" in listing["failed"]["broken"]
    assert "plugin 'broken' is skipped: failed to load" in out.stderr


def test_raghub_load_plugins_limits_third_party_plugins(third_party_env):
    env = {**third_party_env, "RAGHUB_LOAD_PLUGINS": "broken"}
    out = subprocess.run([str(RAGHUB), "plugins", "--json"], env=env, capture_output=True, text=True)
    assert all(p["name"] != "uniform" for p in json.loads(out.stdout)["plugins"])


@pytest.mark.real_model
def test_third_party_method_runs_on_a_real_task(third_party_env, tmp_path):
    out = subprocess.run([str(RAGHUB), "run", "--task", "wikitext2", "--method", "uniform",
                          "--limit", "1", "--json", "--results-dir", str(tmp_path)],
                         env=third_party_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    vocabulary = record["metrics"]["ppl"]
    assert vocabulary == pytest.approx(49152, rel=1e-4)  # SmolLM2's vocabulary size


# --- the embedded default model on the real WikiText task -----------------------------------

@pytest.mark.real_model
def test_the_headline_command_runs_as_written_on_a_fresh_machine(tmp_path):
    """README's first command, with no RAGHUB_DATA_DIR, from an unrelated folder: the data folder
    beside the checkout is found, and without a train split the datastore falls back."""
    env = {key: value for key, value in os.environ.items() if key != "RAGHUB_DATA_DIR"}
    out = subprocess.run([str(RAGHUB), "run", "--task", "wikitext2", "--method", "ensemble", "--n-docs", "4",
                          "--limit", "1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "retrieving from the evaluated split's other articles" in out.stderr
    assert "1 example · SmolLM2-135M-Instruct-Q4_1 · stored in results" in out.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "results" / "records.jsonl").read_text().splitlines()]
    assert "(heldout-articles)" in record["corpus"] and record["config"]["task"]["datastore"] == "heldout-articles"


@pytest.mark.real_model
def test_none_on_wikitext2_writes_a_record_that_the_leaderboard_shows(tmp_path):
    results = str(tmp_path / "results")
    result = invoke("run", "--task", "wikitext2", "--method", "none", "--limit", "2", "--json",
                    "--results-dir", results)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    for metric in ("nats_per_token", "ppl", "bits_per_byte"):
        assert record["metrics"][metric] > 0
    import torch

    from raghub.kits.pretrained import native_dtype

    # the default dtype is auto: what this machine's CPU computes natively, which the record says
    assert record["model"] == "SmolLM2-135M-Instruct-Q4_1" and record["config"]["dtype"] == "auto"
    assert record["hardware"]["dtype"] == record["config"]["model_dtype"] == native_dtype(torch.device("cpu"))
    assert record["hardware"]["allocator"] == allocator.in_effect()
    assert not list((tmp_path / "results" / ".partial").iterdir())  # the resume file is gone
    board = invoke("leaderboard", "--results-dir", results, "--task", "wikitext2")
    assert "| none |" in board.output and "bits_per_byte" in board.output
