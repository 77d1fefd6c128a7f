"""One test per hookspec, each through the plugin manager with an in-process plugin, and a
test that every hookspec has one (`test_hook_<hook name>`)."""

import json

import click
import pytest

from plugin_packages import RUN_TIME, RecordingModel, invoke, registering
from raghub import (Example, Field, Judge, Judgeable, Method, ModelBackend, Objective, Option, Passage, Refiner,
                    Reranker, Retriever, Task, UsageError, hookimpl, read_task_definition)
from raghub import hookspecs as hookspecs_module
from raghub.cli import cli
from raghub.models import choose_backend



# --- the toy plugins ------------------------------------------------------------------------

class Words(Task):
    """Each word of the YAML's `words` is an example; correct when the method returns it."""

    family = "words"
    higher_is_better = {"accuracy": True}
    definition_schema = {"words": Field(list, required=True)}

    def examples(self, model, limit):
        return [Example(id=word, query=word) for word in self.config["words"][:limit]]

    def corpus(self):
        return [Passage(id=word, text=word) for word in self.config["words"]], "the words"

    def evaluate(self, method, examples, retrieved):
        answers = method.answer(examples, retrieved)
        return [{"correct": float(a == e.id)} for a, e in zip(answers, examples)]

    def aggregate(self, stats):
        return {"accuracy": sum(s["correct"] for s in stats) / len(stats)}


WORDS_TASK = {"name": "three-words", "family": "words", "words": ["alpha", "beta", "gamma"]}


class Copy(Method):
    name = "copy"
    description = "answers with the best passage's text"
    options = {"shout": Option(bool, False, "answer in capitals")}

    def answer(self, questions, retrieved):
        texts = [hits[0].passage.text if hits else "" for hits in retrieved]
        return [t.upper() if self.settings["shout"] else t for t in texts]


class Exact(Retriever):
    name = "exact"
    description = "finds the passage whose text is the query"

    def index(self, passages, corpus_fingerprint):
        self.texts = [p.text for p in passages]

    def search(self, queries, k):
        return [[(self.texts.index(q), 1.0)][:k] for q in queries]


class Toy(ModelBackend):
    name = "toy"
    description = "a model that knows nothing"
    handles_description = "a name ending in .toy"
    options = {"width": Option(int, 4, "the toy's width", at_least=1)}

    @classmethod
    def handles(cls, spec):
        return spec is not None and spec.endswith(".toy")

    def load(self, spec, device, dtype, batch_size):
        return RecordingModel(spec, batch_size)


# --- a test per hook ------------------------------------------------------------------------

def test_hook_register_task_families(host, add_plugin, tmp_path):
    add_plugin(registering("register_task_families", Words))
    assert host.registry.task_families["words"] is Words
    assert host.registry.origins[("task family", "words")] == RUN_TIME
    task_file = tmp_path / "misspelled.yaml"
    task_file.write_text("name: misspelled\nfamily: words\nwordz: [alpha]\n")
    result = invoke("run", "--task", str(task_file), "--method", "none", "--results-dir", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert f"{task_file}: unknown key 'wordz' (did you mean 'words'?)" in result.output


def test_hook_register_tasks(host, add_plugin, capsys):
    add_plugin(registering("register_tasks", WORDS_TASK))
    broken = add_plugin(registering("register_tasks", {"name": "no-family"}))
    found = host.registry
    assert found.tasks["three-words"] == WORDS_TASK
    assert found.origins[("task", "three-words")] == RUN_TIME
    assert "no-family" not in found.tasks
    assert f"plugin '{broken}' is skipped: its register_tasks failed: UsageError: a task " \
           f"definition lacks 'family'" in capsys.readouterr().err
    assert "three-words" in invoke("tasks").output


def test_a_task_definition_read_by_the_public_reader_registers(host, add_plugin, tmp_path):
    """`read_task_definition` (public) gives what `register_tasks` takes, `include:` merged."""
    (tmp_path / "_words.yaml").write_text("family: words\nwords: [alpha, beta]\n")
    (tmp_path / "two-words.yaml").write_text("name: two-words\ninclude: _words.yaml\n")
    add_plugin(registering("register_task_families", Words))
    add_plugin(registering("register_tasks", read_task_definition(tmp_path / "two-words.yaml")))
    assert host.registry.tasks["two-words"] == {"name": "two-words", "family": "words", "words": ["alpha", "beta"],
                                             "source": str(tmp_path / "two-words.yaml")}


def test_hook_register_methods(host, add_plugin):
    add_plugin(registering("register_methods", Copy))
    assert host.registry.methods["copy"] is Copy
    assert host.registry.origins[("method", "copy")] == RUN_TIME
    row = next(line for line in invoke("methods").output.splitlines() if "copy" in line)
    assert RUN_TIME in row and "--shout" in row


def test_hook_register_retrievers(host, add_plugin):
    add_plugin(registering("register_retrievers", Exact))
    retriever = host.registry.retrievers["exact"](cache=None)
    retriever.index([Passage("a", "alpha"), Passage("b", "beta")], "fingerprint")
    assert retriever.search(["beta", "alpha"], k=1) == [[(1, 1.0)], [(0, 1.0)]]
    row = next(line for line in invoke("retrievers").output.splitlines() if "exact" in line)
    assert RUN_TIME in row


class Shortest(Reranker):
    name = "shortest"
    description = "prefers short passages"

    def score(self, queries, candidates):
        return [[-len(p.text) for p in passages] for passages in candidates]


class FirstWord(Refiner):
    name = "first-word"
    description = "keeps each passage's first word"
    options = {"upper": Option(bool, False, "in capitals")}

    def refine(self, queries, passages):
        return [[p.text.split()[0] for p in own] for own in passages]


def test_hook_register_rerankers(host, add_plugin, capsys):
    add_plugin(registering("register_rerankers", Shortest))
    broken = add_plugin(registering("register_rerankers", Exact))  # a retriever is no reranker
    found = host.registry
    assert found.rerankers["shortest"] is Shortest and found.origins[("reranker", "shortest")] == RUN_TIME
    assert f"plugin '{broken}' is skipped: its register_rerankers failed: UsageError: it registered " \
           f"{Exact!r} as a reranker, which must be a subclass of raghub.Reranker" in capsys.readouterr().err
    assert Shortest(None, None).score(["q"], [[Passage("a", "long one"), Passage("b", "short")]]) == [[-8, -5]]
    row = next(line for line in invoke("rerankers").output.splitlines() if "shortest" in line)
    assert RUN_TIME in row


def test_hook_register_refiners(host, add_plugin, capsys):
    add_plugin(registering("register_refiners", FirstWord))

    class Unnamed(FirstWord):
        name = ""

    broken = add_plugin(registering("register_refiners", Unnamed))
    found = host.registry
    assert found.refiners["first-word"] is FirstWord and "" not in found.refiners
    assert f"plugin '{broken}' is skipped: its register_refiners failed: UsageError: its refiner Unnamed has " \
           "name ''" in capsys.readouterr().err
    assert FirstWord(None, None).refine(["q"], [[Passage("a", "two words")]]) == [["two"]]
    row = next(line for line in invoke("refiners").output.splitlines() if "first-word" in line)
    assert RUN_TIME in row and "--upper" in row


def test_hook_register_models(host, add_plugin):
    add_plugin(registering("register_models", Toy))
    found = host.registry
    assert found.models["toy"] is Toy and "hf-causal" in found.models
    backend = choose_backend(found, "tiny.toy")  # hf-causal handles this spec too
    assert isinstance(backend, Toy) and backend.settings == {"width": 4}
    assert choose_backend(found, "tiny.toy", model_args="width=8").settings == {"width": 8}
    with pytest.raises(UsageError, match="model backend 'toy' has no option depth"):
        choose_backend(found, "tiny.toy", model_args="depth=2")
    with pytest.raises(UsageError, match="width must be at least 1, not 0"):
        choose_backend(found, "tiny.toy", model_args="width=0")
    assert not isinstance(choose_backend(found, "org/model"), Toy)
    row = next(line for line in invoke("models").output.splitlines() if "toy" in line)
    assert RUN_TIME in row and "a name ending in .toy" in row and "width" in row


class Squared(Objective):
    name = "squared"
    description = "the squared top score, a toy loss"
    options = {"scale": Option(float, 1.0, "multiplies the loss")}

    def loss(self, scores, doc_logprobs):
        return self.settings["scale"] * scores[..., 0] ** 2


def test_hook_register_objectives(host, add_plugin):
    import torch

    add_plugin(registering("register_objectives", Squared))
    found = host.registry
    assert found.objectives["squared"] is Squared and {"rag-sequence", "rag-token", "lsr"} <= found.objectives.keys()
    assert found.origins[("objective", "squared")] == RUN_TIME
    loss = found.objectives["squared"](scale=2.0).loss(torch.tensor([[3.0, 1.0]]), torch.zeros(1, 2, 1))
    assert loss.tolist() == [18.0]
    help_text = invoke("train", "--help").output
    assert "squared" in help_text and "lsr" in help_text


class Lenient(Judge):
    name = "lenient"
    description = "says yes to any non-empty prediction, a toy judge"

    def p_yes(self, examples, prompt):
        return [(float(bool(e.prediction)), "no model asked") for e in examples]


def test_hook_register_judges(host, add_plugin):
    add_plugin(registering("register_judges", Lenient))
    found = host.registry
    assert found.judges["lenient"] is Lenient and "correctness" in found.judges
    assert found.origins[("judge", "lenient")] == RUN_TIME
    examples = [Judgeable("q?", ("a",), "a"), Judgeable("q?", ("a",), "")]
    assert found.judges["lenient"](model=None).p_yes(examples, 0) == [(1.0, "no model asked"), (0.0, "no model asked")]


def test_a_judge_of_another_base_is_refused(host, add_plugin, capsys):
    add_plugin(registering("register_judges", Copy))
    assert "copy" not in host.registry.judges
    assert "must be a subclass of raghub.Judge" in capsys.readouterr().err


class HelloCommand:
    """Adds `raghub hello`, which reports what the registry holds."""

    @hookimpl
    def register_commands(self, cli):
        @cli.command()
        @click.pass_obj
        def hello(host):
            """Greets, counting the methods of the invocation's plugin host."""
            assert host is click.get_current_context().obj
            found = host.registry
            click.echo(f"hello from a plugin; {len(found.methods)} methods, copy: {'copy' in found.methods}")


def test_hook_register_commands(host, add_plugin):
    add_plugin(HelloCommand())
    add_plugin(registering("register_methods", Copy))
    result = invoke("hello")
    assert "hello" in invoke("--help").output and "hello" not in cli.commands
    assert result.exit_code == 0, result.output
    assert result.output == f"hello from a plugin; {len(host.registry.methods)} methods, copy: True\n"


def test_a_run_through_plugins_of_every_registration_hook(add_plugin, tmp_path, monkeypatch):
    """Task family, task, method, retriever and model backend, all from plugins: a whole run."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    for hook, item in [("register_task_families", Words), ("register_tasks", WORDS_TASK),
                       ("register_methods", Copy), ("register_retrievers", Exact), ("register_models", Toy)]:
        add_plugin(registering(hook, item))
    result = invoke("run", "--task", "three-words", "--method", "copy", "--retriever", "exact",
                    "--model", "tiny.toy", "--model-args", "width=2", "--n-docs", "1", "--limit", "2",
                    "--json", "--results-dir", str(tmp_path / "results"))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["metrics"] == {"accuracy": 1.0} and record["n_examples"] == 2
    assert record["model"] == "tiny.toy" and record["config"]["model_backend"] == {"name": "toy", "width": 2}
    assert record["plugins"] == {"task family": RUN_TIME, "method": RUN_TIME, "retriever": RUN_TIME}


# --- the rule -------------------------------------------------------------------------------

def hook_names():
    """The hookspecs' names, as raghub.hookspecs declares them."""
    return sorted(name for name, value in vars(hookspecs_module).items() if hasattr(value, "raghub_spec"))


def test_every_hook_has_a_test():
    assert len(hook_names()) >= 6
    untested = [name for name in hook_names() if not callable(globals().get(f"test_hook_{name}"))]
    assert not untested, f"tests/test_hooks.py has no test_hook_<name> for: {', '.join(untested)}"
