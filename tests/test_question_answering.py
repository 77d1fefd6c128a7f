"""The `qa` task family: format readers, corpus, sampling, prompts, REPLUG voting, scoring."""

import json
import math

import pandas
import pytest
from click.testing import CliRunner

from plugin_packages import ShortBackend, ShortModel
from raghub import Passage, PromptTemplate, Question, Retrieved, RunError, UsageError, hookimpl
from raghub.cache import Cache
from raghub.cli import cli
from raghub.families.qa import extract_answer
from raghub.interfaces import PASSAGES_DROPPED, Registry
from raghub.metrics import ratio_estimates
from raghub.plugins.methods.ensemble import Ensemble
from raghub.plugins.methods.incontext import InContext
from raghub.plugins.methods.ensemble import replug_answer_scores, replug_vote
from raghub.plugins.tasks.question_answering.formats import make_passage
from raghub.plugins.tasks.question_answering.task import QATask, aggregate_stats, deduplicate, interleave_by_type, question_stats


class ChatStub:
    """Stands in for the model where only `chat_prompt` is used."""

    @staticmethod
    def chat_prompt(message):
        return f"<user>{message}</user><assistant>"


def make_task(tmp_path, fmt, filename, content, registry=None, **config):
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_text(content, encoding="utf-8")
    definition = {"name": "toy", "family": "qa", "prompt": "completion",
                  "data": {"folder": "toy", "file": filename, "format": fmt,
                           "get": "toy file from the test"}, **config}
    return QATask("toy", definition, str(tmp_path / "data"), registry)


# ------------------------------------------------------------------ extraction and prompts

@pytest.mark.parametrize("generated, answer", [
    (" George Orwell\n\nQuestion: next one", "George Orwell"),
    ("\n\nThe answer is: Ulm.\nMore text", "Ulm."),
    ("the answer is yes", "yes"),
    ("Answer: Paris", "Paris"),
    ("", ""),
])
def test_extract_answer_takes_first_line_without_lead_in(generated, answer):
    assert extract_answer(generated) == answer


def test_completion_template_puts_shots_then_passages_then_question():
    template = PromptTemplate(style="completion", few_shot=(("Q1?", "A1"),))
    passage = Passage(id="p", title="Ulm", text="Einstein was born in Ulm.")
    assert Question(id="1", query="q", question="Where?", template=template).prompt([passage]) == (
        "Question: Q1?\nAnswer: A1\n\nPassage 1: Ulm\nEinstein was born in Ulm.\n\n"
        "Question: Where?\nAnswer:")


def test_chat_template_wraps_instruction_and_question():
    template = PromptTemplate(style="chat", chat=ChatStub.chat_prompt)
    prompt = Question(id="1", query="q", question="Where?", template=template).prompt([])
    assert prompt == f"<user>{PromptTemplate.INSTRUCTION}\n\nQuestion: Where?</user><assistant>"


# ------------------------------------------------------------------ prompts longer than the model takes

def ranked_passages(count: int) -> list[Retrieved]:
    """`count` passages of 40 characters, best first."""
    return [Retrieved(Passage(id=f"p{rank}", text=str(rank % 10) * 40), -float(rank)) for rank in range(1, count + 1)]


def questions_for(model: ShortModel, count: int = 2) -> list[Question]:
    template = PromptTemplate(style="completion", model=model)
    return [Question(id=f"q{i}", query="q", question=f"Question {i}?", template=template, max_new_tokens=8)
            for i in range(count)]


def test_passages_that_would_not_fit_the_model_are_left_out_lowest_ranked_first_and_counted(capsys):
    model = ShortModel(length=300)
    questions, docs = questions_for(model), ranked_passages(10)
    InContext(model, None).answer(questions, [docs, docs[:2]])
    ((crowded, roomy), _), = model.calls
    kept = crowded.count("Passage ")
    assert 0 < kept < 10
    assert crowded == questions[0].template.render("Question 0?", [r.passage for r in docs[:kept]])
    assert len(crowded) <= 300 - 8 < len(questions[0].template.render("Question 0?", [r.passage for r in docs[:kept + 1]]))
    assert roomy.count("Passage ") == 2
    assert model.counters[PASSAGES_DROPPED] == 10 - kept
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 1 and "question q0: its prompt with 10 passages is longer than the 292 tokens" in notices[0]


def test_each_ensemble_prompt_is_fitted_alone():
    model = ShortModel(length=120)  # room for one 40-character passage, not two
    (question,) = questions_for(model, 1)
    Ensemble(model, None).answer([question], [ranked_passages(3)])
    ((prompts, _),) = model.calls
    assert [prompt.count("Passage ") for prompt in prompts] == [1, 1, 1]
    assert model.counters[PASSAGES_DROPPED] == 0


def test_a_question_too_long_for_the_model_without_passages_is_one_line():
    model = ShortModel(length=30)
    with pytest.raises(RunError, match="question q0: its prompt is longer than the 22 tokens short leaves "
                                       "beside 8 answer tokens even without passages"):
        InContext(model, None).answer(questions_for(model, 1), [ranked_passages(2)])


class ShortModels:
    @hookimpl
    def register_models(self, register):
        register(ShortBackend)


def test_squad_with_more_passages_than_the_model_takes_says_so_and_counts_them(add_plugin, tmp_path, monkeypatch):
    """`--n-docs 60` on SQuAD: the prompt outgrew the model, which was not checked (the embedded
    model ran past its 8192 positions, for minutes)."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    add_plugin(ShortModels())
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", "incontext", "--n-docs", "60",
                                      "--limit", "2", "--model", "short:2000", "--json",
                                      "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert 0 < record["method_stats"][PASSAGES_DROPPED] < 2 * 60
    assert result.stderr.count(PASSAGES_DROPPED) == 1


# ------------------------------------------------------------------ REPLUG answer vote

def test_replug_scores_sum_normalised_duplicates_by_hand():
    # weights = softmax([2, 1, 0]) = [e², e, 1] / (e² + e + 1)
    z = math.e ** 2 + math.e + 1
    totals = replug_answer_scores(["Paris", "London", "paris."],
                                  [[-1.0, -1.4], [-0.01], [-0.2]], [2.0, 1.0, 0.0])
    paris = math.e ** 2 / z * math.exp(-1.2) + 1 / z * math.exp(-0.2)   # 0.2003 + 0.0737
    london = math.e / z * math.exp(-0.01)                               # 0.2423
    assert totals == pytest.approx({"paris": paris, "london": london})
    # alone, "Paris" (0.2003) loses to "London"; with its duplicate it wins
    assert replug_vote(["Paris", "London", "paris."],
                       [[-1.0, -1.4], [-0.01], [-0.2]], [2.0, 1.0, 0.0]) == "Paris"
    assert replug_vote(["Paris", "London"], [[-1.0, -1.4], [-0.01]], [2.0, 1.0]) == "London"


def test_replug_temperature_flattens_or_sharpens_the_weights():
    # T=1: X = e/(e+1)·e⁻¹ = 1/(e+1) = Y
    # T=2: X ∝ e^0.5·e⁻¹ = 0.61 < Y ∝ 1;  T=0.5: X ∝ e²·e⁻¹ = e > Y ∝ 1
    args = (["X", "Y"], [[-1.0], [0.0]], [1.0, 0.0])
    totals = replug_answer_scores(*args)
    assert totals["x"] == pytest.approx(1 / (math.e + 1)) and totals["y"] == pytest.approx(1 / (math.e + 1))
    assert replug_vote(*args, temperature=2.0) == "Y"
    assert replug_vote(*args, temperature=0.5) == "X"


def test_replug_empty_generation_scores_zero():
    assert replug_answer_scores(["", "x"], [[], [-50.0]], [5.0, 0.0])[""] == 0.0
    assert replug_vote([], [], []) == ""


def test_replug_empty_answer_scores_zero_even_from_a_generation():
    """A generation whose first line reads as no answer ("Answer:" alone) has no vote: the
    higher-weighted passage's empty answer beat the other passage's "Ulm"."""
    assert replug_answer_scores(["", "Ulm"], [[-0.1, -0.1], [-0.5]], [5.0, 0.0])[""] == 0.0
    assert replug_vote(["", "Ulm"], [[-0.1, -0.1], [-0.5]], [5.0, 0.0]) == "Ulm"
    assert replug_vote(["", " "], [[-0.1], [-0.2]], [1.0, 0.0]) == ""


# ------------------------------------------------------------------ corpus and sampling

def test_deduplicate_merges_same_title_and_text_only():
    first, again = make_passage("Ulm", "A city."), make_passage("Ulm", "A city.")
    other_title = make_passage("Neu-Ulm", "A city.")
    assert first.id == again.id != other_title.id
    assert deduplicate([first, other_title, again]) == [first, other_title]


def test_interleave_by_type_caps_each_type_and_alternates():
    questions = [Question(id=str(i), query="", type=t) for i, t in enumerate("aaabbc")]
    assert [q.id for q in interleave_by_type(questions, 2)] == ["0", "3", "5", "1", "4"]
    assert [q.id for q in interleave_by_type(questions, None)] == ["0", "3", "5", "1", "4", "2"]


def test_sample_first_or_per_type_and_limit(tmp_path):
    rows = [{"test_id": i, "question": f"q{i}", "answer": "x"} for i in range(5)]
    task = make_task(tmp_path, "aliases", "q.json", json.dumps(rows), sample={"first": 3})
    assert [q.id for q in task.examples(ChatStub(), None)] == ["0", "1", "2"]
    assert [q.id for q in task.examples(ChatStub(), 4)] == ["0", "1", "2", "3"]
    typed = "\n".join(json.dumps({"id": i, "question": "q", "golden_answers": ["x"],
                                   "metadata": {"prop": kind}}) for i, kind in enumerate("aab"))
    task = make_task(tmp_path, "flashrag", "p.jsonl", typed, sample={"per_type": 1})
    assert [q.id for q in task.examples(ChatStub(), None)] == ["0", "2"]
    assert [q.id for q in task.examples(ChatStub(), 3)] == ["0", "2", "1"]   # limit overrides


# ------------------------------------------------------------------ format readers

SQUAD = {"version": "1.1", "data": [{"title": "Super_Bowl_50", "paragraphs": [
    {"context": "Denver beat Carolina.", "qas": [
        {"id": "q1", "question": "Who won?", "answers": [
            {"text": "Denver", "answer_start": 0}, {"text": "Denver", "answer_start": 0},
            {"text": "Denver Broncos", "answer_start": 0}]},
        {"id": "q2", "question": "Who lost?", "answers": [{"text": "Carolina", "answer_start": 12}]}]}]}]}


def test_squad_reader_keeps_all_answers_and_gold_paragraph(tmp_path):
    task = make_task(tmp_path, "squad", "dev.json", json.dumps(SQUAD))
    first, second = task.examples(ChatStub(), None)
    passages, label = task.corpus()
    assert first.answers == ["Denver", "Denver Broncos"]
    assert [(p.title, p.text) for p in passages] == [("Super Bowl 50", "Denver beat Carolina.")]
    assert first.gold_passage_ids == second.gold_passage_ids == [passages[0].id]
    assert "1 passages" in label


class FirstPassage:
    """A method stub that answers with its first passage's text (run with no retrieval bound)."""

    n_docs, first_stage = 0, True

    @staticmethod
    def answer(questions, retrieved):
        return [docs[0].passage.text for docs in retrieved]


def test_recall_is_not_reported_in_a_user_corpus_where_gold_passages_are_unknown(tmp_path):
    task = make_task(tmp_path, "squad", "dev.json", json.dumps(SQUAD))
    questions = task.examples(ChatStub(), 1)
    own = [[Retrieved(p, 1.0) for p in task.corpus()[0]]]
    assert task.evaluate(FirstPassage, questions, own)[0]["recall@1"] == 1.0
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text("id\ttext\ttitle\n1\tDenver won.\tSuper Bowl\n")
    task.settings["corpus"] = str(tsv)
    user = [[Retrieved(p, 1.0) for p in task.corpus()[0]]]
    stats = task.evaluate(FirstPassage, questions, user)[0]
    assert not any(key.startswith("recall@") for key in stats) and "recall@1" not in aggregate_stats([stats])


@pytest.mark.parametrize("corpus_file, content, recall", [
    ("notes.txt", "X is a thing.\n\nZ is a thing.\n", None),
    ("psgs.tsv", "id\ttext\n1\tX is a thing.\n", None),
    ("psgs.tsv", "id\ttext\ttitle\n1\tX is a thing.\tX\n", 0.5),
])
def test_recall_is_not_reported_in_a_user_corpus_without_titles(tmp_path, corpus_file, content, recall):
    """Regression: under --corpus recall counts gold titles, and a corpus of untitled passages
    (a text file, a .tsv without a title column) can match none, so a multi-hop task reported
    recall 0 for every question, however good the retrieval."""
    rows = [hotpot_row("a", "Q a?", "yes", "comparison", ["X", "Y"], ["X", "Y"])]
    task = make_task(tmp_path, "hotpotqa", "dev.json", json.dumps(rows))
    (tmp_path / corpus_file).write_text(content)
    task.settings["corpus"] = str(tmp_path / corpus_file)
    questions = task.examples(ChatStub(), None)
    stats = task.evaluate(FirstPassage, questions, [[Retrieved(p, 1.0) for p in task.corpus()[0]][:1]])[0]
    assert stats.get("recall@1") == recall


def test_questions_whose_gold_passages_the_corpus_lacks_are_said(tmp_path, capsys):
    """Regression: a file whose contexts lack some questions' gold (HotpotQA's fullwiki
    samples) gave those questions recall 0 with nothing said about why."""
    rows = [hotpot_row("a", "Q a?", "yes", "comparison", ["X", "Y"], ["X", "Y"]),
            hotpot_row("b", "Q b?", "no", "bridge", ["X"], ["X", "W"])]
    make_task(tmp_path, "hotpotqa", "dev.json", json.dumps(rows)).corpus()
    assert "1 of 2 questions have gold passages that its corpus lacks" in capsys.readouterr().err
    make_task(tmp_path, "hotpotqa", "dev.json", json.dumps(rows[:1])).corpus()
    assert capsys.readouterr().err == ""


def test_recall_is_named_by_the_passages_asked_for_when_a_stage_leaves_fewer(tmp_path):
    """Regression: recall was keyed by how many passages a question kept, so where a refiner
    dropped a passage for some questions the record held recall@2 and recall@3, each a mean over
    a different subset of the questions, under --n-docs 3."""
    task = make_task(tmp_path, "squad", "dev.json", json.dumps(SQUAD))
    questions = task.examples(ChatStub(), None)
    gold = task.corpus()[0][0]
    other = make_passage("Elsewhere", "Nothing here.")

    class ThreeAskedFor(FirstPassage):
        n_docs = 3

    kept = [[Retrieved(gold, 3.0), Retrieved(other, 2.0), Retrieved(other, 1.0)],  # all three kept
            [Retrieved(other, 2.0), Retrieved(gold, 1.0)]]                         # one dropped
    stats = task.evaluate(ThreeAskedFor, questions, kept)
    assert [s["recall@3"] for s in stats] == [1.0, 1.0]
    assert not any(key.startswith("recall@") and key != "recall@3" for s in stats for key in s)
    assert aggregate_stats(stats)["recall@3"] == 1.0


def hotpot_row(qid, question, answer, kind, titles, supporting):
    return {"_id": qid, "question": question, "answer": answer, "type": kind,
            "context": [[t, [f"{t} is a thing.", f" It is in {t}ville."]] for t in titles],
            "supporting_facts": [[t, 0] for t in supporting]}


def test_hotpotqa_official_reader_pools_contexts_and_keeps_types(tmp_path):
    rows = [hotpot_row("a", "Q a?", "yes", "comparison", ["X", "Y"], ["X", "Y"]),
            hotpot_row("b", "Q b?", "Xville", "bridge", ["X", "Z"], ["X"])]
    task = make_task(tmp_path, "hotpotqa", "dev.json", json.dumps(rows))
    questions = task.examples(ChatStub(), None)
    passages, _ = task.corpus()
    assert [(q.id, q.type, q.gold_titles) for q in questions] == [
        ("a", "comparison", ["X", "Y"]), ("b", "bridge", ["X"])]
    assert [p.title for p in passages] == ["X", "Y", "Z"]           # X appears twice, kept once
    assert passages[0].text == "X is a thing. It is in Xville."


def test_hotpotqa_reader_reads_the_hub_layout(tmp_path):
    row = {"id": "h", "question": "Q?", "answer": "A", "type": "bridge",
           "context": {"title": ["T"], "sentences": [["One.", " Two."]]},
           "supporting_facts": {"title": ["T"], "sent_id": [1]}}
    (question,) = make_task(tmp_path, "hotpotqa", "rows.jsonl", json.dumps(row)).examples(ChatStub(), None)
    assert (question.id, question.gold_titles) == ("h", ["T"])


def test_2wiki_column_json_reader_adds_aliases_from_side_file(tmp_path):
    rows = [hotpot_row("w1", "Who directed Film?", "Ann Lee", "compositional", ["Film", "Ann Lee"], ["Film"])]
    frame = pandas.DataFrame(rows).rename(columns={"_id": "_1"})
    aliases = [{"test_id": 0, "question": "Who directed Film?", "answer": ["Ann Lee", "Anne Lee"]}]
    task = make_task(tmp_path, "hotpotqa", "dev.tts.json", frame.to_json(),
                     data={"folder": "toy", "file": "dev.tts.json", "format": "hotpotqa",
                           "aliases_file": "aliases.json"})
    (tmp_path / "data" / "toy" / "aliases.json").write_text(json.dumps(aliases))
    (question,) = task.examples(ChatStub(), None)
    assert (question.id, question.answers, question.type) == ("w1", ["Ann Lee", "Anne Lee"], "compositional")


def test_ircot_reader_takes_types_from_side_file(tmp_path):
    row = {"question_id": "i1", "question_text": "Same nationality?",
           "answers_objects": [{"spans": ["yes"]}],
           "contexts": [{"title": "A", "paragraph_text": "a", "is_supporting": True},
                        {"title": "B", "paragraph_text": "b", "is_supporting": False}]}
    task = make_task(tmp_path, "ircot", "dev.jsonl", json.dumps(row) + "\r\n",
                     data={"folder": "toy", "file": "dev.jsonl", "format": "ircot",
                           "types_file": "types.json"})
    (tmp_path / "data" / "toy" / "types.json").write_text(
        json.dumps([{"question": "Same nationality?", "answer": "yes", "type": "comparison"}]))
    (question,) = task.examples(ChatStub(), None)
    assert (question.answers, question.gold_titles, question.type) == (["yes"], ["A"], "comparison")
    assert len(task.corpus()[0]) == 2


def test_popqa_tsv_and_flashrag_readers(tmp_path):
    tsv = "id\tquestion\tprop\tpossible_answers\n7\tWho composed X?\tcomposer\t[\"Ann\", \"A. Lee\"]\n"
    (question,) = make_task(tmp_path, "popqa", "popQA.tsv", tsv).examples(ChatStub(), None)
    assert (question.id, question.answers, question.type) == ("7", ["Ann", "A. Lee"], "composer")
    row = {"id": "t1", "question": "Q?", "golden_answers": ["B"], "metadata": {"prop": "genre"}}
    (question,) = make_task(tmp_path, "flashrag", "p.jsonl", json.dumps(row)).examples(ChatStub(), None)
    assert (question.answers, question.type) == (["B"], "genre")


def test_a_tsv_data_file_reads_a_field_longer_than_csvs_default_limit(tmp_path):
    """Regression: a field over 128 KiB was a `_csv.Error` traceback."""
    long = "Who " * 40_000 + "composed X?"
    tsv = f"id\tquestion\tprop\tpossible_answers\n7\t{long}\tcomposer\t[\"Ann\"]\n"
    (question,) = make_task(tmp_path, "popqa", "popQA.tsv", tsv).examples(ChatStub(), None)
    assert (question.question, question.answers) == (long, ["Ann"])


def test_cwq_official_reader_collects_aliases_and_type(tmp_path):
    rows = [{"ID": "c1", "question": "Q?", "compositionality_type": "conjunction",
             "answers": [{"answer": "Brazil", "aliases": ["Brasil"]}]}]
    (question,) = make_task(tmp_path, "cwq", "dev.json", json.dumps(rows)).examples(ChatStub(), None)
    assert (question.answers, question.type) == (["Brazil", "Brasil"], "conjunction")


def answer_rows(fmt, answer, question="Q?"):
    """Two rows of `fmt`, the second with `answer` as its answer field's value and `question`
    as its question's."""
    def row(qid, value, text):
        return {
            "squad": {"id": qid, "title": "T", "context": "c", "question": text, "answers": {"text": value}},
            "hotpotqa": hotpot_row(qid, text, value, "bridge", ["X"], ["X"]),
            "ircot": {"question_id": qid, "question_text": text, "answers_objects": [{"spans": value}],
                      "contexts": []},
            "popqa": {"id": qid, "question": text, "prop": "p", "possible_answers": json.dumps(value)},
            "flashrag": {"id": qid, "question": text, "golden_answers": value},
            "aliases": {"test_id": qid, "question": text, "answer": value},
            "cwq": {"ID": qid, "question": text, "answers": [{"answer": value, "aliases": value}]},
        }[fmt]
    return "\n".join(json.dumps(r) for r in (row("q1", ["A"], "Q?"), row("q2", answer, question)))


FIELD_OF = {"squad": "answers.text", "hotpotqa": "answer", "ircot": "answers_objects.spans",
            "popqa": "possible_answers", "flashrag": "golden_answers", "aliases": "answer",
            "cwq": "answers.answer / answers.aliases"}


@pytest.mark.parametrize("fmt", FIELD_OF)
def test_an_answer_given_as_a_string_or_a_number_is_one_answer_in_every_format(tmp_path, fmt):
    """Regression: a string answer was iterated into its letters (EM 0 for the right answer),
    and a number crashed the scoring after generation."""
    for given, expected in (("Paris", ["Paris"]), ([75001, "Paris"], ["75001", "Paris"])):
        task = make_task(tmp_path, fmt, "dev.jsonl", answer_rows(fmt, given))
        question = task.examples(ChatStub(), None)[1]
        assert question.answers == expected
        assert question_stats(question, expected[0], [])["em"] == 1.0


@pytest.mark.parametrize("fmt", FIELD_OF)
@pytest.mark.parametrize("answer, problem", [
    ([], "holds no answer"), ([""], "holds no answer"), ([" \t"], "holds no answer"),
    (None, "must be a text or a list of texts, not None"),
    ({"text": "Paris"}, "must be a text or a list of texts, not {'text': 'Paris'}"),
    ([["Paris"]], "must be a text or a list of texts, not [['Paris']]"),
], ids=["empty-list", "empty-text", "blank-text", "null", "object", "nested-list"])
def test_an_answer_field_without_an_answer_is_one_line_naming_the_file_row_and_field(tmp_path, fmt, answer, problem):
    """Regression: an empty answer list was silently scored 0, and null or an object ended in a
    traceback or a guess at the format."""
    task = make_task(tmp_path, fmt, "dev.jsonl", answer_rows(fmt, answer))
    with pytest.raises(UsageError) as refused:
        task.examples(ChatStub(), None)
    assert str(refused.value) == f"{tmp_path / 'data' / 'toy' / 'dev.jsonl'}, row 2: '{FIELD_OF[fmt]}' {problem}"


def test_a_blank_alias_is_no_answer(tmp_path):
    """Regression: a whitespace-only alias was kept as a gold answer, and it normalises to the
    empty text, so an empty prediction scored EM 1 on its question."""
    task = make_task(tmp_path, "flashrag", "dev.jsonl", answer_rows("flashrag", ["Paris", " "]))
    question = task.examples(ChatStub(), None)[1]
    assert question.answers == ["Paris"] and question_stats(question, "", [])["em"] == 0.0


@pytest.mark.parametrize("fmt", FIELD_OF)
@pytest.mark.parametrize("question", [None, "", "  ", 5], ids=["null", "empty", "blank", "number"])
def test_a_row_without_a_question_text_is_one_line_naming_the_file_row_and_field(tmp_path, fmt, question):
    """Regression: a null, empty or numeric question was asked as the prompt "Question: None"
    (or blank, or "5") and scored like any other."""
    field = "question_text" if fmt == "ircot" else "question"
    task = make_task(tmp_path, fmt, "dev.jsonl", answer_rows(fmt, ["A"], question))
    with pytest.raises(UsageError) as refused:
        task.examples(ChatStub(), None)
    assert str(refused.value).startswith(f"{tmp_path / 'data' / 'toy' / 'dev.jsonl'}, row 2: '{field}' ")


TYPE_ROWS = {
    "hotpotqa": ("type", lambda kind: hotpot_row("q", "Q?", "A", kind, ["X"], ["X"])),
    "popqa": ("prop", lambda kind: {"id": "q", "question": "Q?", "prop": kind, "possible_answers": '["A"]'}),
    "flashrag": ("metadata.prop", lambda kind: {"id": "q", "question": "Q?", "golden_answers": ["A"],
                                                "metadata": {"prop": kind}}),
    "cwq": ("compositionality_type", lambda kind: {"ID": "q", "question": "Q?", "compositionality_type": kind,
                                                   "answers": [{"answer": "A", "aliases": []}]}),
}


@pytest.mark.parametrize("fmt", TYPE_ROWS)
@pytest.mark.parametrize("kind", [None, 3], ids=["null", "number"])
def test_a_question_type_that_is_no_text_is_one_line_naming_the_file_row_and_field(tmp_path, fmt, kind):
    """Regression: a null or numeric type beside the others' texts was read as it was, and the
    by-type table of the finished run ended in a traceback (None and texts cannot be sorted)."""
    field, row = TYPE_ROWS[fmt]
    task = make_task(tmp_path, fmt, "dev.jsonl", json.dumps(row(kind)))
    with pytest.raises(UsageError) as refused:
        task.examples(ChatStub(), None)
    assert str(refused.value).startswith(f"{tmp_path / 'data' / 'toy' / 'dev.jsonl'}, row 1: '{field}' ")


def test_a_types_file_type_that_is_no_text_is_one_line_naming_the_file_and_row(tmp_path):
    row = {"question_id": "i1", "question_text": "Q?", "answers_objects": [{"spans": ["A"]}], "contexts": []}
    task = make_task(tmp_path, "ircot", "dev.jsonl", json.dumps(row),
                     data={"folder": "toy", "file": "dev.jsonl", "format": "ircot", "types_file": "types.json"})
    (tmp_path / "data" / "toy" / "types.json").write_text(json.dumps([{"question": "Q?", "type": None}]))
    with pytest.raises(UsageError, match=r"types\.json, row 1: 'type' must be the question's type as a text"):
        task.examples(ChatStub(), None)


@pytest.mark.parametrize("key, side_row", [
    ("aliases_file", {"test_id": 0, "question": "Another question?", "answer": ["B"]}),
    ("types_file", {"question": "Another question?", "type": "bridge"}),
])
def test_a_side_file_matching_no_question_is_one_line(tmp_path, key, side_row):
    """Regression: aliases and types are matched by question text, and a side file of another
    dataset or sample, matching none, was silently ignored: no alias counted, no by-type table."""
    row = {"question_id": "i1", "question_text": "Q?", "answers_objects": [{"spans": ["A"]}], "contexts": []}
    task = make_task(tmp_path, "ircot", "dev.jsonl", json.dumps(row),
                     data={"folder": "toy", "file": "dev.jsonl", "format": "ircot", key: "side.json"})
    (tmp_path / "data" / "toy" / "side.json").write_text(json.dumps([side_row]))
    with pytest.raises(UsageError, match=r"side\.json: none of its 1 question texts is one of dev\.jsonl's 1"):
        task.examples(ChatStub(), None)


def test_two_questions_with_the_same_id_are_refused_naming_both_rows(tmp_path):
    """Regression: the second question's result silently replaced the first's."""
    rows = [{"id": qid, "question": "Q?", "golden_answers": ["A"]} for qid in ("a", "b", "a")]
    task = make_task(tmp_path, "flashrag", "dev.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UsageError, match=r"dev\.jsonl: rows 1 and 3 have the same id 'a'"):
        task.examples(ChatStub(), None)


def test_missing_data_file_names_it_and_where_to_get_it(tmp_path):
    task = make_task(tmp_path, "squad", "present.json", "{}")
    task.config["data"]["file"] = "dev-v1.1.json"
    with pytest.raises(UsageError, match=r"toy/dev-v1\.1\.json \(toy file from the test\)"):
        task.examples(ChatStub(), None)


def test_user_corpus_replaces_the_task_corpus(tmp_path):
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text("id\ttext\ttitle\n1\tDenver won.\tSuper Bowl\n")
    task = make_task(tmp_path, "squad", "dev.json", json.dumps(SQUAD))
    task.settings["corpus"] = str(tsv)
    passages, label = task.corpus()
    assert passages == [Passage(id="1", title="Super Bowl", text="Denver won.")]
    assert str(tsv) in label
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "title": "x"}) + "\n")
    task.settings["corpus"] = str(bad)
    with pytest.raises(UsageError, match="passage 1 has no text"):
        task.corpus()


def test_stand_in_corpus_pools_the_named_tasks(tmp_path):
    source = make_task(tmp_path, "squad", "dev.json", json.dumps(SQUAD))
    rows = [{"test_id": 0, "question": "Q?", "answer": ["A"]}]
    stand_in = make_task(tmp_path, "aliases", "q.json", json.dumps(rows),
                         Registry(tasks={"toysquad": source.config}), corpus_from=["toysquad"])
    passages, label = stand_in.corpus()
    assert passages == source.corpus()[0] and label.startswith("stand-in corpus")
    stand_in.config["corpus_from"] = ["nosuchtask"]
    with pytest.raises(UsageError, match="nosuchtask"):
        stand_in.corpus()


# ------------------------------------------------------------------ scoring

def retrieved(*titles):
    return [Retrieved(Passage(id=t.lower(), title=t, text=""), score=1.0) for t in titles]


def test_question_stats_recall_over_gold_titles_and_ids():
    question = Question(id="1", query="", answers=["Ann Lee", "A. Lee"], type="bridge",
                        gold_titles=["X", "Y"])
    stats = question_stats(question, "ann lee", retrieved("X", "Z", "W"))
    assert (stats["em"], stats["f1"], stats["recall@3"]) == (1.0, 1.0, 0.5)
    by_id = Question(id="2", query="", answers=["a"], gold_passage_ids=["z"])
    assert question_stats(by_id, "b", retrieved("X", "Z"))["recall@2"] == 1.0
    assert "recall@0" not in question_stats(by_id, "b", [])        # closed book: no recall


def test_aggregate_means_and_by_type():
    stats = [{"type": "bridge", "em": 1.0, "f1": 1.0, "match": 1.0, "recall@2": 0.5},
             {"type": "bridge", "em": 0.0, "f1": 0.5, "match": 1.0, "recall@2": 1.0},
             {"type": "comparison", "em": 0.0, "f1": 0.0, "match": 0.0, "recall@2": 0.0}]
    metrics = aggregate_stats(stats)
    assert metrics["em"] == pytest.approx(1 / 3) and metrics["f1"] == pytest.approx(0.5)
    assert metrics["match"] == pytest.approx(2 / 3)
    assert metrics["recall@2"] == pytest.approx(0.5) and metrics["n_questions"] == 3
    assert metrics["by_type"] == {"bridge": {"em": 0.5, "f1": 0.75, "match": 1.0, "count": 2},
                                  "comparison": {"em": 0.0, "f1": 0.0, "match": 0.0, "count": 1}}
    assert "by_type" not in aggregate_stats([{"type": "", "em": 1.0, "f1": 1.0}])


def test_match_is_scored_with_its_standard_error_and_left_out_of_old_samples():
    question = Question(id="1", query="", answers=["Denver Broncos"])
    stats = [question_stats(question, prediction, [])
             for prediction in ("the Denver Broncos won", "Denver", "Denver Broncos")]
    assert [s["match"] for s in stats] == [1.0, 0.0, 1.0]
    assert QATask.metric_terms(stats[0])["match"] == (1.0, 1.0)
    mean, se = ratio_estimates([QATask.metric_terms(s) for s in stats])["match"]
    assert (mean, se) == (pytest.approx(2 / 3), pytest.approx(1 / 3))  # sample sd sqrt(1/3), n = 3
    old = [{"type": "", "em": 1.0, "f1": 1.0}]                      # a line scored before match
    assert "match" not in aggregate_stats(old) and "match" not in QATask.metric_terms(old[0])


# ------------------------------------------------------------------ the real model

@pytest.mark.real_model
def test_methods_answer_with_the_embedded_model(tmp_path):
    """Closed book and in-context answer every question; a one-passage ensemble asks the
    model exactly what in-context does, so both give the same answer."""
    from raghub.models import load_model
    from raghub.plugins.methods.ensemble import Ensemble
    from raghub.plugins.methods.incontext import InContext
    from raghub.plugins.methods.none import ClosedBook

    model = load_model(None)
    cache = Cache(tmp_path)
    template = PromptTemplate(style="completion", few_shot=(("Who wrote Hamlet?", "Shakespeare"),))
    questions = [Question(id=str(i), query=q, question=q, template=template, max_new_tokens=8)
                 for i, q in enumerate(["What colour is the sky of Zorbland?", "Who founded Qux?"])]
    docs = [[Retrieved(Passage(id="z", title="Zorbland", text="The sky of Zorbland is green."), 3.0)],
            [Retrieved(Passage(id="q", title="Qux", text="Qux was founded by Mara Vell."), 2.0)]]
    closed = ClosedBook(model, cache).answer(questions, [[], []])
    in_context = InContext(model, cache).answer(questions, docs)
    ensemble = Ensemble(model, cache).answer(questions, docs)
    assert len(closed) == len(in_context) == 2 and all(isinstance(a, str) for a in closed)
    assert ensemble == in_context
