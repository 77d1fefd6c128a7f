"""`Method.retrieve`: a method asks for passages while it works, through the run's retriever:
each call logged in the example's samples-log line, cached like the first stage, never from an
example's excluded group, and refused in one line when the run has no retriever."""

import re

import pytest
from click.testing import CliRunner

from raghub import Example, Method, Passage, Task
from raghub.cache import Cache
from raghub.cli import cli
from raghub.retrieval import Retrieval
from scripted import BRIDGE, COMPARISON, Overlap, ScriptedBackend, ScriptedModel, scripted, tail  # noqa: F401


class AsksTwice(Method):
    """Asks for its passages itself: each question, then "long river" again for the first
    question; answers each question from its first call's passages."""

    name = "asks-twice"
    first_stage = False
    given = None

    def answer(self, questions, retrieved):
        AsksTwice.given = retrieved
        hits = self.retrieve([*questions, questions[0]], [*(q.question for q in questions), "long river"], self.n_docs)
        prompts = [q.prompt([hit.passage for hit in found]) for q, found in zip(questions, hits)]
        generations = self.generate(questions, prompts, 16, one_line=True)
        return [q.answer_from(g.text) for q, g in zip(questions, generations)]


def answers_from_the_question(prompt):
    return " Ulm\nmore" if BRIDGE in tail(prompt) else " Gamma River\n"


def hit(title, score, rank, gold):
    return {"title": title, "score": score, "rank": rank, "gold": gold}


def without_ids(calls):
    """The calls' hits without the passages' ids and first words (the titles name them here)."""
    return [{**call, "hits": [{k: v for k, v in h.items() if k not in ("id", "text_start")} for h in call["hits"]]}
            for call in calls]


@pytest.fixture
def asks_twice(scripted):
    scripted.register(AsksTwice)
    ScriptedBackend.model = ScriptedModel(answers_from_the_question)
    return scripted


def test_each_call_is_logged_as_the_next_step_of_its_example(asks_twice):
    record, (bridge, comparison) = asks_twice.run("asks-twice", "--n-docs", 2)
    assert AsksTwice.given == [[], []]  # no first stage
    assert Overlap.asked == [BRIDGE, COMPARISON, "long river"]  # one batched call
    # overlap with BRIDGE's words (where, director, alpha, film, born): Alpha Film 2, Bea Mann 2;
    # with "long river": Gamma River 2, Delta River 2 (ties in corpus order)
    assert without_ids(bridge["retrievals"]) == [
        {"step": 1, "query": BRIDGE, "hits": [hit("Alpha Film", 2.0, 1, True), hit("Bea Mann", 2.0, 2, True)]},
        {"step": 2, "query": "long river", "hits": [hit("Gamma River", 2.0, 1, False), hit("Delta River", 2.0, 2, False)]},
    ]
    assert without_ids(comparison["retrievals"]) == [
        {"step": 1, "query": COMPARISON, "hits": [hit("Gamma River", 2.0, 1, True), hit("Delta River", 2.0, 2, True)]},
    ]
    assert bridge["retrieved"] == comparison["retrieved"] == [] and "recall@2" not in bridge
    assert (bridge["prediction"], comparison["prediction"]) == ("Ulm", "Gamma River")
    # " Ulm" "\n" (the line ends there); " Gamma" " River" "\n"
    assert (bridge["generated_tokens"], comparison["generated_tokens"]) == (2, 3)
    assert record["method_stats"] == {"retrieval_calls_per_example": 1.5, "generated_tokens_per_example": 2.5}
    assert record["n_docs"] == 2 and record["retriever"] == "overlap"


def test_a_second_identical_run_asks_the_retriever_nothing(asks_twice):
    _, first = asks_twice.run("asks-twice", "--n-docs", 2)
    Overlap.asked = []
    _, again = asks_twice.run("asks-twice", "--n-docs", 2, results="another-store")
    assert Overlap.asked == [] and again == first
    asks_twice.run("asks-twice", "--n-docs", 2, "--force")  # --force recomputes every stage
    assert Overlap.asked == [BRIDGE, COMPARISON, "long river"]


def test_samples_shows_the_queries_asked_and_what_came_back(asks_twice):
    asks_twice.run("asks-twice", "--n-docs", 2)
    shown = CliRunner().invoke(cli, ["samples", "latest", "--results-dir", str(asks_twice.folder / "results")],
                               env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert f"asked 1 {BRIDGE}" in shown.output and "asked 2 long river" in shown.output
    assert "1. Alpha Film (2.00) gold" in shown.output
    assert re.search(r"1\. Gamma River \(2\.00\) +│", shown.output)  # the bridge question's, not gold
    assert "retrievals" not in shown.output and "generated_tokens 2" in shown.output


class AsksWithoutRetriever(Method):
    """Closed book by its declaration, yet asks for passages."""

    name = "asks-without-retriever"
    needs_retrieval = False

    def answer(self, questions, retrieved):
        return [hits[0].passage.title for hits in self.retrieve(questions, [q.question for q in questions], 1)]


class FirstStageless(AsksWithoutRetriever):
    """Asks for all its passages itself, and declares it needs no retriever."""

    name = "first-stageless"
    first_stage = False


def test_a_method_asking_in_a_run_without_retriever_gets_one_line_and_exit_2(scripted):
    scripted.register(AsksWithoutRetriever)
    ScriptedBackend.model = ScriptedModel(answers_from_the_question)
    out = scripted.invoke("asks-without-retriever")
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert out.output.strip().splitlines()[-1] == (
        "Error: method 'asks-without-retriever' calls retrieve, but it declares needs_retrieval = False, "
        "so the run has no retriever; declare needs_retrieval = True")
    assert not (scripted.folder / "results" / "records.jsonl").exists()


def test_a_method_without_first_stage_or_retriever_is_refused_before_the_model_loads(scripted):
    scripted.register(FirstStageless)
    out = scripted.invoke("first-stageless")
    assert out.exit_code == 2 and ScriptedBackend.loads == 0
    assert "method 'first-stageless' asks for its own passages (first_stage = False) but declares " \
           "needs_retrieval = False" in out.output
    assert not (scripted.folder / "results").exists()


class Grouped(Task):
    """Four passages, two of them in group "a"."""

    family = "grouped"

    def corpus(self):
        return [Passage("a1", "river delta", group="a"), Passage("a2", "river", group="a"),
                Passage("b1", "river gamma", group="b"), Passage("c1", "lake")], "four passages"

    examples = evaluate = aggregate = None


def test_each_query_keeps_out_its_own_examples_group(tmp_path):
    method = Method(ScriptedModel(answers_from_the_question), None)
    retrieval = Retrieval(Grouped("grouped", {}, None), Overlap(None), Cache(tmp_path))
    retrieval.open()
    method.bind_retrieval(retrieval, 2)
    inside, outside = Example("1", "x", exclude_group="a"), Example("2", "x")
    hits = method.retrieve([inside, outside, inside], ["river delta", "river delta", "lake"], 2)
    # "river delta" scores a1 2, a2 1, b1 1, c1 0; "lake" scores c1 1, then 0 in corpus order
    assert [[h.passage.id for h in found] for found in hits] == [["b1", "c1"], ["a1", "a2"], ["c1", "b1"]]
    assert [call["query"] for call in method.work.take("1")["retrievals"]] == ["river delta", "lake"]
    assert method.work.take("1") == {}  # taken once
