"""Third-party plugins as users install them: hostile ones are named and skipped, never fatal;
the plugin guide's package (tests/third_party_plugin) installs, runs on the real tasks, and is
exactly what README.md shows; a change to its code is never answered from the cache."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import raghub
from plugin_packages import (ECHO_BACKEND, PLUGIN_PACKAGE, THIRD_PARTY_PLUGIN, RecordingModel,
                             install_third_party_plugin, run_raghub, write_distribution)
from raghub import Passage, PromptTemplate, Question, Retrieved, answer_questions
from raghub.plugin_manager import DEFAULT_PLUGINS
from raghub.record import Record
from raghub.records import read_samples
from scripted import BRIDGE, COMPARISON, Overlap, ScriptedBackend, ScriptedModel, scripted, titles  # noqa: F401
from test_models import save_tiny_model

README = Path(__file__).parents[1] / "README.md"

# --- hostile plugins, each loaded alone (RAGHUB_LOAD_PLUGINS) beside a well-behaved one -------

HOSTILE_PLUGINS = {
    "misspelled": """
        from raghub import hookimpl

        @hookimpl
        def register_method(register):
            pass
    """,
    "raiser": """
        from raghub import hookimpl

        @hookimpl
        def register_methods(register):
            raise RuntimeError("the raiser plugin exploded")
    """,
    "exiter": """
        import sys

        sys.exit(3)
    """,
    "shadow": """
        from raghub import Method, Option, hookimpl

        class Shadowing(Method):
            name = "shadowing"
            options = {"limit": Option(int, 1, "a plugin's own limit")}

        @hookimpl
        def register_methods(register):
            register(Shadowing)
    """,
    "polite": """
        from raghub import Method, hookimpl

        class Polite(Method):
            name = "polite"
            description = "a well-behaved third-party method"

        @hookimpl
        def register_methods(register):
            register(Polite)
    """,
}


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    """A PYTHONPATH folder holding every plugin of HOSTILE_PLUGINS as a distribution."""
    site = tmp_path_factory.mktemp("hostile-site")
    for name, source in HOSTILE_PLUGINS.items():
        write_distribution(site, name, source)
    return site


def listing(out):
    """`raghub plugins --json`'s output: {plugin name: origin}, and the failed plugins."""
    assert out.returncode == 0, out.stderr
    parsed = json.loads(out.stdout)
    return {p["name"]: p["origin"] for p in parsed["plugins"]}, parsed["failed"]


def test_a_misspelled_hook_is_named_and_its_plugin_skipped(hostile_site):
    loaded, failed = listing(run_raghub(hostile_site, "plugins", "--json", load="misspelled,polite"))
    assert "misspelled" not in loaded and loaded["polite"] == "polite 0.1"
    assert failed["misspelled"].startswith("register_method is not a raghub hook")
    tasks = run_raghub(hostile_site, "tasks", load="misspelled,polite")
    assert tasks.returncode == 0 and "wikitext2" in tasks.stdout
    assert "plugin 'misspelled' is skipped: register_method is not a raghub hook" in tasks.stderr


def test_a_raising_hook_is_named_and_the_other_plugins_still_work(hostile_site):
    out = run_raghub(hostile_site, "methods", load="raiser,polite")
    assert out.returncode == 0, out.stderr
    assert ("plugin 'raiser' is skipped: its register_methods failed: RuntimeError: "
            "the raiser plugin exploded") in out.stderr
    assert "polite" in out.stdout and "ensemble" in out.stdout


def test_a_plugin_that_exits_on_import_leaves_raghub_running(hostile_site):
    out = run_raghub(hostile_site, "plugins", "--json", load="exiter,polite")
    loaded, failed = listing(out)
    assert set(DEFAULT_PLUGINS) <= loaded.keys() and "polite" in loaded
    assert failed == {"exiter": "failed to load: SystemExit: 3"}
    assert "plugin 'exiter' is skipped" in out.stderr


def test_a_method_whose_option_shadows_a_core_setting_is_named_and_not_registered(hostile_site):
    methods = run_raghub(hostile_site, "methods", load="shadow,polite")
    assert methods.returncode == 0, methods.stderr
    assert ("plugin 'shadow' is skipped: its register_methods failed: UsageError: its method "
            "'shadowing' declares option(s) limit, which are raghub's own settings") in methods.stderr
    assert "shadowing" not in methods.stdout and "polite" in methods.stdout
    run = run_raghub(hostile_site, "run", "--task", "wikitext2", "--method", "shadowing", load="shadow")
    assert run.returncode == 2 and "unknown method 'shadowing'" in run.stderr


# --- the plugin guide's package -------------------------------------------------------------

def plugin_module():
    """tests/third_party_plugin/raghub_uniform, imported from its folder."""
    spec = importlib.util.spec_from_file_location("raghub_uniform", PLUGIN_PACKAGE / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def questions_and_hits():
    """Two questions, each with three retrieved passages, best first."""
    template = PromptTemplate(style="completion")
    questions = [Question(id=str(n), query=q, question=q, max_new_tokens=n + 4, template=template)
                 for n, q in enumerate(["Who?", "Where?"])]
    hits = [[Retrieved(Passage(f"{q.id}-{rank}", f"passage {rank} of {q.id} " * 3, "Title"), 1.0 / (rank + 1))
             for rank in range(3)] for q in questions]
    return questions, hits


def test_top1_answers_like_standard_rag_with_the_best_passage_only():
    questions, hits = questions_and_hits()
    top1, reference = RecordingModel(), RecordingModel()
    answers = plugin_module().Top1(top1, cache=None).answer(questions, hits)
    expected = answer_questions(reference, questions, [[h[0].passage] for h in hits])
    assert answers == expected and answers[0].isdigit()
    assert top1.calls == reference.calls and top1.calls[0][1] == 5  # the largest max_new_tokens
    assert "passage 0 of 0" in top1.calls[0][0][0] and "passage 1" not in top1.calls[0][0][0]


def test_top1_cuts_the_passage_to_passage_words():
    questions, hits = questions_and_hits()
    model = RecordingModel()
    plugin_module().Top1(model, cache=None, passage_words=3).answer(questions, hits)
    assert "Passage 1: Title\npassage 0 of\n" in model.calls[0][0][0]


def test_uniform_gives_every_token_minus_log_vocabulary():
    class Window:
        target_ids = [5, 6, 7]

    scores = plugin_module().Uniform(RecordingModel(), cache=None).score_windows([Window()], [[]])
    assert scores[0].tolist() == pytest.approx([-6.907755] * 3)  # ln 1000


def test_two_hop_asks_with_the_question_then_with_the_best_title_added(scripted):
    scripted.register(plugin_module().TwoHop)
    ScriptedBackend.model = ScriptedModel(lambda prompt: " Ulm\n")
    record, lines = scripted.run("two-hop", "--n-docs", 1)
    # the best passage for each question (words shared with it): Alpha Film (2, before Bea
    # Mann's 2), Gamma River (2, before Delta River's 2); the title adds no new word
    assert Overlap.asked == [BRIDGE, COMPARISON, f"{BRIDGE} Alpha Film", f"{COMPARISON} Gamma River"]
    assert [[call["query"] for call in line["retrievals"]] for line in lines] == [
        [BRIDGE, f"{BRIDGE} Alpha Film"], [COMPARISON, f"{COMPARISON} Gamma River"]]
    assert [titles(prompt) for prompt in ScriptedBackend.model.prompts] == [["Alpha Film"], ["Gamma River"]]
    assert record["method_stats"]["retrieval_calls_per_example"] == 2
    assert [line["prediction"] for line in lines] == ["Ulm", "Ulm"]


def readme_plugin_guide():
    """The '## Writing a plugin' section of README.md."""
    text = README.read_text(encoding="utf-8")
    return text.split("\n## Writing a plugin\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("language, file_name", [
    ("toml", "pyproject.toml"), ("python", "raghub_uniform/__init__.py"), ("yaml", "raghub_uniform/capitals.yaml"),
    ("json", "raghub_uniform/capitals.jsonl")])
def test_the_readme_shows_the_plugin_package_exactly(language, file_name):
    blocks = re.findall(rf"```{language}\n(.*?)```", readme_plugin_guide(), re.DOTALL)
    assert (THIRD_PARTY_PLUGIN / file_name).read_text(encoding="utf-8") in blocks


def test_the_plugin_guide_names_the_whole_public_api():
    missing = [name for name in raghub.__all__ if f"`{name}`" not in readme_plugin_guide()]
    assert not missing, f"README's plugin guide does not mention {', '.join(missing)}"


def test_the_plugin_module_uses_only_the_public_api():
    source = (PLUGIN_PACKAGE / "__init__.py").read_text(encoding="utf-8")
    imports = re.findall(r"^\s*(?:from (\S+) import|import (\S+))", source, re.MULTILINE)
    assert {a or b for a, b in imports} <= {"raghub", "math", "random", "torch", "importlib.resources"}


def test_random_draws_k_distinct_passages_the_same_for_a_query_and_seed():
    passages = [Passage(str(n), f"passage {n}") for n in range(10)]
    retriever = plugin_module().RandomPassages(cache=None)
    retriever.index(passages, "corpus")
    first, again = retriever.search(["Who?", "Where?"], 4), retriever.search(["Who?", "Where?"], 4)
    assert first == again and first[0] != first[1]
    assert all(len({p for p, _ in hits}) == 4 and all(0 <= p < 10 for p, _ in hits) for hits in first)
    reseeded = plugin_module().RandomPassages(cache=None, draw_seed=1)
    reseeded.index(passages, "corpus")
    assert reseeded.search(["Who?"], 4) != first[:1]
    assert len(retriever.search(["Who?"], 50)[0]) == 10


@pytest.fixture(scope="module")
def guide_site(tmp_path_factory):
    """A PYTHONPATH folder with tests/third_party_plugin pip-installed into it, and the `echo`
    model backend."""
    site = tmp_path_factory.mktemp("guide-site")
    install_third_party_plugin(site, tmp_path_factory.mktemp("guide-src"))
    write_distribution(site, "echo", ECHO_BACKEND)
    return site


def test_the_installed_package_registers_its_three_methods(guide_site):
    out = run_raghub(guide_site, "methods")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "raghub-uniform 0.1.0" in line]
    assert [row.split()[1] for row in rows] == ["top1", "two-hop", "uniform"]
    assert "--passage-words" in out.stdout
    retrievers = run_raghub(guide_site, "retrievers")
    assert "random" in retrievers.stdout and "--draw-seed" in retrievers.stdout
    bad = run_raghub(guide_site, "run", "--task", "squad", "--method", "top1", "--passage-words", "-1")
    assert bad.returncode == 2 and "--passage-words must be at least 0, not -1" in bad.stderr


def test_the_installed_package_leaves_torch_unimported_until_a_run(guide_site):
    """`raghub --help` and friends stay fast: importing every plugin does not import torch."""
    check = "import sys, raghub.cli; assert 'uniform' in raghub.cli.PluginHost().registry.methods; " \
            "assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": str(guide_site)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def run_record(site, results_dir, *args):
    out = run_raghub(site, "run", *map(str, args), "--json", "--results-dir", str(results_dir))
    assert out.returncode == 0, out.stderr
    return Record.from_dict(json.loads(out.stdout))


def test_two_hop_runs_installed_on_hotpotqa(guide_site, tmp_path):
    save_tiny_model(tmp_path / "tiny", seed=0)
    record = run_record(guide_site, tmp_path, "--task", "hotpotqa", "--method", "two-hop", "--model",
                        str(tmp_path / "tiny"), "--n-docs", 2, "--limit", 2)
    assert record.method == "two-hop" and record.plugins["method"] == "raghub-uniform 0.1.0"
    assert record.method_stats["retrieval_calls_per_example"] == 2
    lines = read_samples(tmp_path, record)
    for line in lines:
        first, second = line["retrievals"]
        assert (first["step"], first["query"]) == (1, line["question"]) and len(first["hits"]) == 2
        assert (second["step"], second["query"]) == (2, f"{line['question']} {first['hits'][0]['title']}")
        assert line["retrieved"] == [] and line["generated_tokens"] > 0


def test_the_installed_package_runs_its_own_task_on_the_data_it_ships(guide_site, tmp_path):
    """The plugin's `capitals.yaml` includes raghub's `_qa.yaml` and reads `capitals.jsonl`
    from the installed package, whatever the data directory."""
    tasks = run_raghub(guide_site, "tasks")
    assert re.search(r"capitals .*raghub-uniform 0\.1\.0", tasks.stdout), tasks.stdout
    empty = tmp_path / "empty-data"
    empty.mkdir()
    record = run_record(guide_site, tmp_path, "--task", "capitals", "--method", "top1", "--model", "echo",
                        "--data-dir", empty)
    assert record.n_examples == 4 and record.metrics["recall@4"] == 1.0
    assert record.corpus.startswith("capitals context paragraphs")


def test_the_installed_reranker_reorders_the_first_stage(guide_site, tmp_path):
    listed = run_raghub(guide_site, "rerankers")
    assert "title-words" in listed.stdout and "raghub-uniform 0.1.0" in listed.stdout
    record = run_record(guide_site, tmp_path, "--task", "hotpotqa", "--method", "top1", "--model", "echo",
                        "--reranker", "title-words", "--rerank-depth", 8, "--n-docs", 3, "--limit", 3)
    assert record.plugins["reranker"] == "raghub-uniform 0.1.0"
    assert record.config["stages"]["reranker"] == {"name": "title-words"} and "reranker=title-words" in record.settings
    lines = read_samples(tmp_path, record)
    assert any(hit["score"] > 0 for line in lines for hit in line["retrieved"])
    for line in lines:
        words = set(line["question"].lower().split())
        assert [hit["score"] for hit in line["retrieved"]] == \
            [float(len(words & set(hit["title"].lower().split()))) for hit in line["retrieved"]]
        assert [hit["score"] for hit in line["retrieved"]] == sorted((hit["score"] for hit in line["retrieved"]),
                                                                     reverse=True)
        assert all(1 <= hit["first_rank"] <= 8 for hit in line["retrieved"])


@pytest.mark.real_model
def test_top1_runs_on_squad(guide_site, tmp_path):
    record = run_record(guide_site, tmp_path, "--task", "squad", "--method", "top1", "--limit", "2")
    assert record.method == "top1" and record.n_examples == 2 and record.retriever == "bm25"
    assert 0 <= record.metrics["em"] <= record.metrics["f1"] <= 1
    assert record.metrics["n_questions"] == 2


@pytest.mark.real_model
def test_uniform_runs_on_wikitext2(guide_site, tmp_path):
    record = run_record(guide_site, tmp_path, "--task", "wikitext2", "--method", "uniform", "--limit", "1")
    assert record.method == "uniform" and record.retriever is None
    assert record.metrics["ppl"] == pytest.approx(49152, rel=1e-4)  # SmolLM2's vocabulary size


# --- a change to the plugin's code is never answered from the cache -------------------------

#: a run of the plugin's retriever that needs no model weights
RANDOM_TOP1 = ("--task", "squad", "--method", "top1", "--retriever", "random", "--model", "echo", "--limit", "3")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty RAGHUB_CACHE for the test's runs."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def local_site(tmp_path):
    """A PYTHONPATH folder holding the plugin's module as a local module (no installer put it
    there), and the `echo` model backend."""
    site = tmp_path / "local-site"
    site.mkdir()
    write_distribution(site, "raghub-uniform", PLUGIN_PACKAGE, module="raghub_uniform")
    write_distribution(site, "echo", ECHO_BACKEND)
    return site


def retrieved_counts(results_dir, record):
    """How many passages each example of a stored run retrieved."""
    return [len(line["retrieved"]) for line in read_samples(results_dir, record)]


def retrieval_entries(cache):
    """The cached retrieval results: one folder each."""
    return sorted(folder.name for folder in (cache / "retrievals").iterdir() if "." not in folder.name)


def test_editing_the_local_plugins_source_recomputes_its_retrieval(local_site, cache, tmp_path):
    """Regression: the next run reused the stored record, and `--force` the cached passages."""
    first = run_record(local_site, tmp_path, *RANDOM_TOP1)
    assert retrieved_counts(tmp_path, first) == [4, 4, 4]
    module = local_site / "raghub_uniform" / "__init__.py"
    module.write_text(module.read_text(encoding="utf-8")
                      + "\nRandomPassages.search = lambda self, queries, k: [[(0, 0.0)] for _ in queries]\n",
                      encoding="utf-8")
    edited = run_record(local_site, tmp_path, *RANDOM_TOP1)
    assert edited.id != first.id and retrieved_counts(tmp_path, edited) == [1, 1, 1]
    assert len(retrieval_entries(cache)) == 2


def test_force_recomputes_the_cached_retrieval(local_site, cache, tmp_path):
    first = run_record(local_site, tmp_path, *RANDOM_TOP1)
    (entry,) = retrieval_entries(cache)
    written = (cache / "retrievals" / entry / "manifest.json").stat().st_mtime_ns
    forced = run_record(local_site, tmp_path, *RANDOM_TOP1, "--force")
    assert forced.id != first.id and retrieval_entries(cache) == [entry]
    assert (cache / "retrievals" / entry / "manifest.json").stat().st_mtime_ns > written


def test_a_new_version_of_the_installed_plugin_recomputes_its_retrieval(guide_site, cache, tmp_path):
    """Regression: after an upgrade from 0.1.0 to 0.2.0 the run stored under 0.1.0 was reused."""
    first = run_record(guide_site, tmp_path, *RANDOM_TOP1)
    upgraded = tmp_path / "upgraded-site"
    install_third_party_plugin(upgraded, tmp_path / "upgraded-src", version="0.2.0")
    write_distribution(upgraded, "echo", ECHO_BACKEND)
    second = run_record(upgraded, tmp_path, *RANDOM_TOP1)
    assert first.plugins["retriever"] == "raghub-uniform 0.1.0"
    assert second.id != first.id and second.plugins["retriever"] == "raghub-uniform 0.2.0"
    assert len(retrieval_entries(cache)) == 2
