"""Plugins that misbehave are named in one line and never crash the harness or corrupt its
output: a bad declaration skips its plugin (every command still works), a plugin's prints never
reach `--json`'s stdout, a plugin cannot replace a raghub command, and what a method, retriever
or task returns is checked where it comes back (exit 1, the finished batches kept)."""

import json
from pathlib import Path
from types import SimpleNamespace

import click
import pytest

from plugin_packages import RUN_TIME, RecordingModel, invoke, registering, run_raghub, write_distribution
from raghub import Method, ModelBackend, Retriever, RunError, Task, Window, hookimpl


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
    version = run_raghub(tmp_path, "--version")  # loads no plugin
    assert version.returncode == 0 and "version" in version.stdout and "Traceback" not in version.stderr
    methods = run_raghub(tmp_path, "methods")
    assert methods.returncode == 0, methods.stderr
    assert skipped in methods.stderr and "Traceback" not in methods.stderr
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
def test_a_bad_registration_is_named_and_its_plugin_skipped(host, add_plugin, capsys, plugin, problem):
    name = add_plugin(plugin)
    found = host.registry
    assert problem in host.failed[name]
    assert f"plugin '{name}' is skipped: " in capsys.readouterr().err
    assert host.plugin(name) is None and "ensemble" in found.methods
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


def test_a_plugin_command_named_like_a_raghub_command_is_refused(host, add_plugin, tmp_path):
    """Regression: the plugin's `leaderboard` silently replaced raghub's."""
    thief = add_plugin(CommandThief())
    hello = invoke("hello")  # the command it added before the refused one goes with it
    assert hello.exit_code == 2 and "No such command 'hello'" in hello.output
    assert host.failed[thief] == ("its register_commands failed: UsageError: its command 'leaderboard' "
                                  "would replace `raghub leaderboard`; it needs another name")
    assert host.plugin(thief) is None
    assert not [name for name in host.failed if name.startswith("raghub.plugins")]
    assert "train" in invoke("--help").output  # the built-in plugins' commands stay
    listing = invoke("plugins")
    assert thief in listing.output and "leaderboard" in listing.output
    board = invoke("leaderboard", "--results-dir", str(tmp_path))
    assert "not the leaderboard" not in board.output


# --- what a method, retriever or task returns ------------------------------------------------

class Recording(ModelBackend):
    name = "recording"

    @classmethod
    def handles(cls, spec):
        return spec == "recording"

    def load(self, spec, device, dtype, batch_size):
        return RecordingModel(spec, batch_size)


class Flaky(Method):
    """Answers 'Paris'; while `broken`, its second batch gets `wrong` instead."""

    name = "flaky"
    needs_retrieval = False
    broken, wrong, asked = True, None, []

    def answer(self, questions, retrieved):
        Flaky.asked.append([q.id for q in questions])
        if Flaky.broken and len(Flaky.asked) == 2:
            return Flaky.wrong(questions)
        return ["Paris" for _ in questions]


@pytest.fixture
def qa_run(add_plugin, tmp_path, monkeypatch):
    """`raghub run` of the tiny QA task (four questions, batches of two) on the recording model,
    with a method (and retriever) the test registers."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    add_plugin(registering("register_models", Recording))
    task = tiny_qa_task(tmp_path)

    def run(*args):
        return invoke("run", "--task", str(task), "--data-dir", str(tmp_path), "--model", "recording",
                      "--batch-size", "2", "--results-dir", str(tmp_path / "results"), *args)
    return run


@pytest.mark.parametrize("wrong, said", [
    (lambda questions: ["Paris"], "returned 1 answer for 2 questions"),
    (lambda questions: None, "returned None; it must return one string per question"),
    (lambda questions: [None, "Paris"], "returned None for question q2; it must return one string per question"),
    (lambda questions: ["Paris", 75001], "returned 75001 for question q3; it must return one string per question"),
], ids=["count", "none", "none-answer", "not-a-string"])
def test_a_method_returning_wrong_answers_is_named_and_the_finished_batch_kept(add_plugin, qa_run, tmp_path,
                                                                               wrong, said):
    """Regression: a traceback inside the QA task (or a silently short run)."""
    Flaky.broken, Flaky.wrong, Flaky.asked = True, staticmethod(wrong), []
    add_plugin(registering("register_methods", Flaky))
    failed = qa_run("--method", "flaky")
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines()[-1:] == [f"Error: method 'flaky' ({RUN_TIME}) {said}"]
    resume = next((tmp_path / "results" / ".partial").glob("*.jsonl"))
    assert [sample["id"] for batch in resume.read_text().splitlines()
            for sample in json.loads(batch)["lines"]] == ["q0", "q1"]
    Flaky.broken, Flaky.asked = False, []
    fixed = qa_run("--method", "flaky", "--json")
    assert fixed.exit_code == 0, fixed.output
    assert json.loads(fixed.stdout)["metrics"]["em"] == 1.0
    assert Flaky.asked == [["q2", "q3"]]  # the finished batch was not asked again


class Wild(Retriever):
    """Returns `hits(number of passages)` for every query."""

    name = "wild"
    hits = None

    def index(self, passages, corpus_fingerprint):
        self.n_passages = len(passages)

    def search(self, queries, k):
        return [Wild.hits(self.n_passages) for _ in queries]


class Copy(Method):
    name = "copy-first"

    def answer(self, questions, retrieved):
        return [hits[0].passage.text for hits in retrieved]


@pytest.mark.parametrize("hits, said", [
    (lambda n: [(n, 1.0)], "returned position 4 for the query of q0, and the corpus has 4 passages (0 to 3)"),
    (lambda n: [(-1, 1.0)], "returned position -1 for the query of q0, and the corpus has 4 passages (0 to 3)"),
    (lambda n: [("0", 1.0)], "returned position '0' for the query of q0, and the corpus has 4 passages (0 to 3)"),
    (lambda n: [(0, "high")], "returned score 'high' for the query of q0; a score is a number"),
    (lambda n: (0, 1.0), "returned (0, 1.0) for the query of q0; it must be a list of (position, score) pairs"),
], ids=["past-the-end", "negative", "not-an-int", "score-not-a-number", "not-a-list"])
def test_a_retriever_returning_a_bad_hit_is_named(add_plugin, qa_run, hits, said):
    """Regression: an IndexError traceback, or (for -1) silently the corpus's last passage."""
    Wild.hits = staticmethod(hits)
    add_plugin(registering("register_retrievers", Wild))
    add_plugin(registering("register_methods", Copy))
    failed = qa_run("--method", "copy-first", "--retriever", "wild", "--n-docs", "1")
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines()[-1:] == [f"Error: retriever 'wild' ({RUN_TIME}) {said}"]


def test_a_retriever_returning_too_few_lists_is_named(add_plugin, qa_run):
    """Regression: the questions past the lists returned silently had no passages."""
    class Short(Wild):
        name = "short"

        def search(self, queries, k):
            return [[(0, 1.0)]]

    add_plugin(registering("register_retrievers", Short))
    add_plugin(registering("register_methods", Copy))
    failed = qa_run("--method", "copy-first", "--retriever", "short", "--n-docs", "1")
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines()[-1:] == [
        f"Error: retriever 'short' ({RUN_TIME}) returned 1 result list for 4 queries"]


class Forgetful(Task):
    """A QA-like family whose evaluate drops the last example's stats."""

    family = "forgetful"

    def examples(self, model, limit):
        from raghub import Example

        return [Example(id=f"e{n}", query="") for n in range(3)]

    def corpus(self):
        return [], ""

    def evaluate(self, method, examples, retrieved):
        return [{"score": 1.0} for _ in examples][:-1]

    def aggregate(self, stats):
        return {"score": 1.0}


def run_family(family, add_plugin, tmp_path, monkeypatch):
    """`raghub run` of the `flaky` method on a task of the task family class `family`."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    add_plugin(registering("register_models", Recording))
    add_plugin(registering("register_task_families", family))
    add_plugin(registering("register_tasks", {"name": family.family, "family": family.family}))
    add_plugin(registering("register_methods", Flaky))
    return invoke("run", "--task", family.family, "--method", "flaky", "--model", "recording",
                  "--results-dir", str(tmp_path / "results"))


def test_a_task_family_returning_too_few_stats_is_named(add_plugin, tmp_path, monkeypatch):
    """Regression: a KeyError traceback after the whole run."""
    failed = run_family(Forgetful, add_plugin, tmp_path, monkeypatch)
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines()[-1:] == [
        f"Error: task family 'forgetful' ({RUN_TIME}) returned 2 stats dicts for 3 examples"]


class Twins(Forgetful):
    """A family whose first and last examples share an id, each scored by its position."""

    family = "twins"

    def examples(self, model, limit):
        from raghub import Example

        return [Example(id=name, query="") for name in ("e0", "e1", "e0")]

    def evaluate(self, method, examples, retrieved):
        return [{"score": float(example is not examples[0])} for example in examples]


def test_a_task_family_giving_two_examples_one_id_is_named(add_plugin, tmp_path, monkeypatch):
    """Regression: the finished examples were kept by id, so the second of two examples with
    one id took the first's place and was counted twice, exit 0."""
    failed = run_family(Twins, add_plugin, tmp_path, monkeypatch)
    assert failed.exit_code == 1 and not (tmp_path / "results" / "records.jsonl").exists()
    assert failed.output.strip().splitlines()[-1:] == [
        f"Error: task family 'twins' ({RUN_TIME}) returned 2 examples with the id 'e0'; each example needs "
        "an id of its own"]


class Scorer(Method):
    name = "scorer"
    scores = None

    def score_windows(self, windows, retrieved):
        return Scorer.scores(windows)


@pytest.mark.parametrize("scores, said", [
    (lambda windows: [], "returned 0 log-prob tensors for 1 window"),
    (lambda windows: [[-1.0, -1.0]], "returned [-1.0, -1.0] for window w0; it must return a 1-D tensor "
                                     "of ln p per target token"),
    (lambda windows: [__import__("torch").zeros(3)], "returned 3 log-probs for window w0, which has 2 "
                                                      "target tokens"),
], ids=["count", "not-a-tensor", "length"])
def test_a_method_returning_wrong_log_probs_is_named(host, add_plugin, scores, said):
    """Regression: a traceback inside the language-modelling task."""
    Scorer.scores = staticmethod(scores)
    add_plugin(registering("register_methods", Scorer))
    found = host.registry
    task = found.task_families["language-modelling"]("wikitext2", found.tasks["wikitext2"], None)
    window = Window(id="w0", query="", context_ids=[1], target_ids=[2, 3], retrieved_max_length=8)
    with pytest.raises(RunError) as raised:  # the family names the method; a run adds its origin, as for QA
        task.evaluate(Scorer(RecordingModel(), cache=None), [window], [[]])
    assert str(raised.value) == f"method 'scorer' {said}"
