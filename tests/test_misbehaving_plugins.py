"""Plugins that misbehave are named in one line and never crash the harness or corrupt its
output: a bad declaration skips its plugin (every command still works), a plugin's prints never
reach `--json`'s stdout, and a plugin cannot replace a raghub command."""

import json
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from plugin_packages import run_raghub, write_distribution
from raghub import Method, Task, hookimpl
from raghub.cli import _add_plugin_commands, cli
from raghub.plugin_manager import failed_plugins, pm, registry

RUN_TIME = "registered at run time"


def invoke(*args):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


def registering(hook_name, *items):
    """An in-process plugin whose `hook_name` hook registers `items`."""
    def hook(register):
        for item in items:
            register(item)
    return SimpleNamespace(**{hook_name: hookimpl(hook)})


# --- declarations, checked when the registry is built ----------------------------------------

LISTY = """
    from raghub import Method, hookimpl

    class Listy(Method):
        name = "listy"
        options = ["temperature"]

    @hookimpl
    def register_methods(register):
        register(Listy)
"""
POLITE = """
    from raghub import Method, hookimpl

    class Polite(Method):
        name = "polite"

    @hookimpl
    def register_methods(register):
        register(Polite)
"""


def test_a_method_whose_options_are_a_list_is_named_and_every_command_still_works(tmp_path):
    """Regression: `cls.options.items()` crashed every command, `raghub --version` included."""
    write_distribution(tmp_path, "listy", LISTY)
    write_distribution(tmp_path, "polite", POLITE)
    skipped = ("plugin 'listy' is skipped: its register_methods failed: UsageError: its method 'listy' "
               "declares options ['temperature'], which must map names to Option values")
    version = run_raghub(tmp_path, "--version")
    assert version.returncode == 0 and "version" in version.stdout
    assert skipped in version.stderr and "Traceback" not in version.stderr
    methods = run_raghub(tmp_path, "methods")
    assert methods.returncode == 0, methods.stderr
    assert "polite" in methods.stdout and "listy" not in methods.stdout


class Unnamed(Method):
    needs_retrieval = False


class BadSchema(Task):
    family = "bad-schema"
    definition_schema = {"words": list}  # not a raghub.Field

    def examples(self, model, limit):
        return []

    def corpus(self):
        return [], ""

    def evaluate(self, method, examples, retrieved):
        return []

    def aggregate(self, stats):
        return {}


class ListyOptions(Method):
    name = "listy-options"
    options = {"temperature": 0.5}  # not a raghub.Option


@pytest.mark.parametrize("plugin, problem", [
    (registering("register_methods", Unnamed.__new__(Unnamed)),
     "its register_methods failed: UsageError: it registered <"),
    (registering("register_methods", "copy"),
     "its register_methods failed: UsageError: it registered 'copy' as a method, which must be a "
     "subclass of raghub.Method"),
    (registering("register_retrievers", Unnamed),
     "it registered <class 'test_misbehaving_plugins.Unnamed'> as a retriever, which must be a subclass "
     "of raghub.Retriever"),
    (registering("register_methods", Unnamed),
     "its method Unnamed has name ''; it must be a non-empty string"),
    (registering("register_methods", ListyOptions),
     "its method 'listy-options' declares options {'temperature': 0.5}, which must map names to Option "
     "values"),
    (registering("register_task_families", BadSchema),
     "its task family 'bad-schema' declares definition_schema {'words': <class 'list'>}, which must map "
     "names to Field values"),
    (registering("register_tasks", ["three-words", "words"]),
     "its register_tasks failed: UsageError: it registered ['three-words', 'words'] as a task "
     "definition, which must be a dict"),
    (registering("register_tasks", {"name": 3, "family": "qa"}),
     "its register_tasks failed: UsageError: a task definition: 'name' must be a string, not 3"),
    (SimpleNamespace(register_methods=hookimpl(lambda register: [Unnamed])),
     "its register_methods failed: UsageError: it returned [<class 'test_misbehaving_plugins.Unnamed'>]; "
     "a hook registers through its "
     "argument (register) and returns nothing"),
], ids=["instance", "string", "wrong-base", "unnamed", "options-not-Option", "schema-not-Field",
        "task-not-dict", "task-name-not-str", "returns-a-value"])
def test_a_bad_registration_is_named_and_its_plugin_skipped(add_plugin, capsys, plugin, problem):
    name = add_plugin(plugin)
    found = registry()
    assert problem in failed_plugins[name]
    assert f"plugin '{name}' is skipped: " in capsys.readouterr().err
    assert pm.get_plugin(name) is None and "ensemble" in found.methods
    assert RUN_TIME not in found.origins.values()


# --- stdout under --json ---------------------------------------------------------------------

CHATTY = """
    import os
    import subprocess
    import sys

    from raghub import Generation, LanguageModel, Method, ModelBackend, hookimpl

    print("chatty: imported")


    class Chatty(Method):
        name = "chatty"
        needs_retrieval = False

        def answer(self, questions, retrieved):
            print("chatty: answering")
            os.write(1, b"chatty: straight to file descriptor 1\\n")
            subprocess.run([sys.executable, "-c", "print('chatty: a child process')"], check=True)
            return ["Paris" for _ in questions]


    class Tokenizer:
        pad_token_id = 0

        def __len__(self):
            return 10


    class Silent(LanguageModel):
        device, dtype = "cpu", "float32"

        def sequence_logprobs(self, sequences, starts):
            raise NotImplementedError

        def generate(self, prompts, max_new_tokens):
            raise NotImplementedError


    class SilentBackend(ModelBackend):
        name = "silent"

        @classmethod
        def handles(cls, spec):
            return spec == "silent"

        def load(self, spec, device, dtype, batch_size):
            print("chatty: loading")
            return Silent(Tokenizer(), "silent", batch_size)


    @hookimpl
    def register_methods(register):
        print("chatty: registering")
        register(Chatty)


    @hookimpl
    def register_models(register):
        register(SilentBackend)
"""


def tiny_qa_task(folder: Path) -> Path:
    """A QA task YAML over four questions in `folder`/tiny/qa.jsonl (SQuAD's flat rows)."""
    (folder / "tiny").mkdir()
    rows = [{"id": f"q{n}", "title": f"T{n}", "context": f"Passage {n} says the capital is Paris.",
             "question": f"What is capital number {n}?", "answers": {"text": ["Paris"]}} for n in range(4)]
    (folder / "tiny" / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = folder / "tiny.yaml"
    task.write_text("name: tiny\nfamily: qa\nprompt: completion\n"
                    "data: {folder: tiny, file: qa.jsonl, format: squad}\n")
    return task


def test_json_stdout_holds_only_the_records_whatever_a_plugin_prints(tmp_path):
    """Regression: a plugin's print (at import, in a hook, in a run), a write to file
    descriptor 1 and a child process's output were mixed into the JSON lines."""
    site, data = tmp_path / "site", tmp_path / "data"
    site.mkdir(), data.mkdir()
    write_distribution(site, "chatty", CHATTY)
    task = tiny_qa_task(data)
    out = run_raghub(site, "run", "--task", str(task), "--data-dir", str(data), "--method", "chatty",
                     "--model", "silent", "--limit", "2", "--json", "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["metrics"]["em"] for line in out.stdout.splitlines()] == [1.0]
    for chatter in ("imported", "registering", "loading", "answering", "straight to file descriptor 1",
                    "a child process"):
        assert f"chatty: {chatter}" in out.stderr
    listing = run_raghub(site, "plugins", "--json")
    assert json.loads(listing.stdout)["plugins"]


# --- commands --------------------------------------------------------------------------------

class CommandThief:
    """Adds `raghub hello`, then a `raghub leaderboard` of its own."""

    @hookimpl
    def register_commands(self, cli):
        @cli.command()
        def hello():
            click.echo("hello")

        @cli.command()
        def leaderboard():
            click.echo("not the leaderboard")


def test_a_plugin_command_named_like_a_raghub_command_is_refused(add_plugin, tmp_path):
    """Regression: the plugin's `leaderboard` silently replaced raghub's."""
    own = cli.commands["leaderboard"]
    thief = add_plugin(CommandThief())
    _add_plugin_commands()
    assert cli.commands["leaderboard"] is own and "hello" not in cli.commands
    assert failed_plugins[thief] == ("its register_commands failed: UsageError: its command 'leaderboard' "
                                     "would replace `raghub leaderboard`; it needs another name")
    assert pm.get_plugin(thief) is None
    assert "train" in cli.commands  # the built-in plugins' commands, added again, stay
    assert not [name for name in failed_plugins if name.startswith("raghub.plugins")]
    listing = invoke("plugins")
    assert thief in listing.output and "leaderboard" in listing.output
    board = invoke("leaderboard", "--results-dir", str(tmp_path))
    assert "not the leaderboard" not in board.output
