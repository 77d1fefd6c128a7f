"""The `qa` task family: open-domain question answering scored by EM / F1 and retrieval recall.

One YAML per dataset (`tasks/squad.yaml`, `hotpotqa.yaml`, `2wiki.yaml`, `popqa.yaml`,
`cwq.yaml`) names its file, the `format` that reads it, the prompt template and the sample.
Every format reader turns rows into the same two things: `Question`s (all gold aliases, the
question type, the gold passages when known) and the context `Passage`s the dataset ships. The
retrieval corpus is those passages pooled over the whole file and de-duplicated; datasets
without contexts pool the other QA tasks' passages instead (`corpus_from`), and the `corpus`
option replaces either with a user's JSONL/TSV of `id, title, text` (e.g. DPR's psgs_w100.tsv).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from raghub.cache import fingerprint
from raghub.hookspecs import hookimpl
from raghub.interfaces import Example, Option, Passage, Retrieved, Task, UsageError
from raghub.metrics import best_over_aliases, exact_match, f1, mean, normalize_answer
from raghub.model import Generation

# --------------------------------------------------------------------------- examples, prompts


@dataclass(frozen=True)
class PromptTemplate:
    """How a question (and its passages) becomes the model input.

    `style` is "chat" (the instruction and question in the model's chat template, for instruct
    models) or "completion" (plain text ending in "Answer:"); `few_shot` holds optional
    `{question, answer}` demonstrations placed first (before any passages).
    """

    style: str = "chat"
    few_shot: tuple[tuple[str, str], ...] = ()
    chat: Callable[[str], str] | None = None

    INSTRUCTION = "Answer the question with a short phrase of a few words, and nothing else."

    def render(self, question: str, passages: Sequence[Passage]) -> str:
        blocks = [f"Question: {q}\nAnswer: {a}" for q, a in self.few_shot]
        blocks += [f"Passage {n}: {p.as_text()}" for n, p in enumerate(passages, 1)]
        if self.style == "chat":
            body = "\n\n".join([self.INSTRUCTION, *blocks, f"Question: {question}"])
            return self.chat(body) if self.chat else body
        return "\n\n".join([*blocks, f"Question: {question}\nAnswer:"])


TEMPLATE_STYLES = ("chat", "completion")
_LEADING_ANSWER_IS = re.compile(r"^\s*(the answer is|answer)\s*:?\s*", re.IGNORECASE)


def extract_answer(generated_text: str) -> str:
    """The first non-empty line of a generation, without a leading "The answer is" / "Answer:"."""
    first_line = next((line for line in generated_text.splitlines() if line.strip()), "")
    return _LEADING_ANSWER_IS.sub("", first_line).strip()


@dataclass
class Question(Example):
    """One QA example: the question, every gold alias, its type, and the gold passages when the
    dataset says which they are (by passage id, or by title for the multi-hop sets)."""

    question: str = ""
    answers: list[str] = field(default_factory=list)
    type: str = ""
    max_new_tokens: int = 32
    gold_passage_ids: list[str] = field(default_factory=list)
    gold_titles: list[str] = field(default_factory=list)
    template: PromptTemplate = field(default_factory=PromptTemplate, repr=False, compare=False)

    def prompt(self, passages: Sequence[Passage]) -> str:
        """The full model input in the task's template, passages included when given."""
        return self.template.render(self.question, passages)

    def extract(self, generated_text: str) -> str:
        """The answer from a generation."""
        return extract_answer(generated_text)

    def recall(self, retrieved: Sequence[Retrieved]) -> float | None:
        """Fraction of the gold passages (ids) and gold titles found in `retrieved`; None when
        the dataset names no gold passage."""
        n_gold = len(self.gold_passage_ids) + len(self.gold_titles)
        if not n_gold:
            return None
        ids = {r.passage.id for r in retrieved}
        titles = {r.passage.title for r in retrieved}
        hits = sum(i in ids for i in self.gold_passage_ids)
        hits += sum(t in titles for t in self.gold_titles)
        return hits / n_gold


def generate_for(model, questions: Sequence[Question],
                 passage_lists: Sequence[Sequence[Passage]]) -> list[Generation]:
    """Greedy generations, one per question with its passages, in one batched call."""
    prompts = [q.prompt(p) for q, p in zip(questions, passage_lists)]
    return model.generate(prompts, max(q.max_new_tokens for q in questions))


def answer_questions(model, questions: Sequence[Question],
                     passage_lists: Sequence[Sequence[Passage]]) -> list[str]:
    """The extracted answer of each question, generated with its passages in the prompt."""
    generations = generate_for(model, questions, passage_lists)
    return [q.extract(g.text) for q, g in zip(questions, generations)]


def replug_answer_scores(answers: Sequence[str], token_logprobs: Sequence[Sequence[float]],
                         scores: Sequence[float], temperature: float = 1.0) -> dict[str, float]:
    """REPLUG for QA: answer k, generated with passage k, scores w_k · exp(mean token log-prob)
    with w = softmax(retrieval scores / temperature) (an empty answer scores 0); the scores of
    answers equal after SQuAD normalisation add up. Returns normalised answer -> total."""
    weights = torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, dim=0)
    totals: dict[str, float] = defaultdict(float)
    for answer, logprobs, weight in zip(answers, token_logprobs, weights.tolist()):
        totals[normalize_answer(answer)] += (weight * math.exp(mean(logprobs))) if logprobs else 0.0
    return dict(totals)


def replug_vote(answers: Sequence[str], token_logprobs: Sequence[Sequence[float]],
                scores: Sequence[float], temperature: float = 1.0) -> str:
    """The answer whose group has the highest REPLUG total (ties: the higher-ranked passage's),
    spelled as its highest-ranked member; "" when there are no answers."""
    if not answers:
        return ""
    totals = replug_answer_scores(answers, token_logprobs, scores, temperature)
    best = max(totals, key=totals.__getitem__)  # first of equal totals = higher ranked
    return next(answer for answer in answers if normalize_answer(answer) == best)


# --------------------------------------------------------------------------- reading files


@dataclass
class Loaded:
    """What a format reader returns: the questions, and the context passages (duplicates kept)."""

    questions: list[Question]
    passages: list[Passage]


def make_passage(title: str, text: str) -> Passage:
    """A passage whose id is derived from its content, so duplicates share an id."""
    return Passage(id=fingerprint(title, text)[:16], title=title, text=text)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def read_rows(path: Path) -> Any:
    """A data file's rows: JSONL lines, a JSON list, a pandas column-oriented JSON object
    (turned into rows), SQuAD's nested JSON (kept whole), or TSV rows with a header."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if path.suffix == ".tsv":
        with open(path, encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "data" not in data:  # pandas `to_json()` column layout
        import pandas

        return pandas.DataFrame(data).to_dict("records")
    return data


def squad_rows(official: dict) -> list[dict]:
    """SQuAD's nested `data → paragraphs → qas` JSON as the hub's flat rows."""
    return [
        {"id": qa["id"], "title": article["title"], "context": paragraph["context"],
         "question": qa["question"], "answers": {"text": [a["text"] for a in qa["answers"]]}}
        for article in official["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


def read_squad(rows: Any) -> Loaded:
    """SQuAD v1.1: the official nested JSON or the hub's flat rows; gold = the question's paragraph."""
    if isinstance(rows, dict):
        rows = squad_rows(rows)
    questions, passages = [], []
    for row in rows:
        passage = make_passage(row["title"].replace("_", " "), row["context"])
        passages.append(passage)
        questions.append(Question(id=row["id"], query=row["question"], question=row["question"],
                                  answers=_unique(row["answers"]["text"]),
                                  gold_passage_ids=[passage.id]))
    return Loaded(questions, passages)


def _title_sentence_pairs(table: Any, second: str) -> list[tuple[str, Any]]:
    """HotpotQA's `[[title, x], ...]` (official) or `{"title": [...], second: [...]}` (hub)."""
    if isinstance(table, dict):
        return list(zip(table["title"], table[second]))
    return [(title, x) for title, x in table]


def read_hotpotqa(rows: Any) -> Loaded:
    """The official HotpotQA layout, shared by 2WikiMultihopQA (`_id`/`_1`, `question`,
    `answer`, `type`, `context`, `supporting_facts`); gold = the supporting facts' titles."""
    questions, passages = [], []
    for row in rows:
        context = _title_sentence_pairs(row["context"], "sentences")
        passages += [make_passage(title, " ".join(s.strip() for s in sentences))
                     for title, sentences in context]
        supporting = _title_sentence_pairs(row["supporting_facts"], "sent_id")
        questions.append(Question(
            id=str(row.get("_id") or row.get("_1") or row["id"]), query=row["question"],
            question=row["question"], answers=_unique(_as_list(row["answer"])),
            type=row.get("type", ""), gold_titles=_unique(title for title, _ in supporting)))
    return Loaded(questions, passages)


def read_ircot(rows: Any) -> Loaded:
    """IRCoT's processed HotpotQA (`question_id`, `question_text`, `answers_objects[].spans`,
    `contexts[]` with `is_supporting`); gold = the supporting contexts' titles."""
    questions, passages = [], []
    for row in rows:
        passages += [make_passage(c["title"], c["paragraph_text"]) for c in row["contexts"]]
        answers = chain.from_iterable(a["spans"] for a in row["answers_objects"])
        questions.append(Question(
            id=row["question_id"], query=row["question_text"], question=row["question_text"],
            answers=_unique(answers),
            gold_titles=_unique(c["title"] for c in row["contexts"] if c["is_supporting"])))
    return Loaded(questions, passages)


def read_popqa(rows: Any) -> Loaded:
    """PopQA's official TSV / hub rows: `possible_answers` is a JSON list; type = relation."""
    return Loaded([
        Question(id=str(row["id"]), query=row["question"], question=row["question"],
                 answers=_unique(json.loads(row["possible_answers"])), type=row["prop"])
        for row in rows], [])


def read_flashrag(rows: Any) -> Loaded:
    """FlashRAG's JSONL (`id`, `question`, `golden_answers`, `metadata.prop` for PopQA)."""
    return Loaded([
        Question(id=str(row["id"]), query=row["question"], question=row["question"],
                 answers=_unique(row["golden_answers"]),
                 type=row.get("metadata", {}).get("prop", ""))
        for row in rows], [])


def read_aliases(rows: Any) -> Loaded:
    """Parametric RAG's alias lists `[{test_id, question, answer: str | [aliases]}]` (CWQ,
    and 2Wiki's alias side file)."""
    return Loaded([
        Question(id=str(row["test_id"]), query=row["question"], question=row["question"],
                 answers=_unique(_as_list(row["answer"])))
        for row in rows], [])


def read_cwq(rows: Any) -> Loaded:
    """ComplexWebQuestions' official JSON (`ID`, `question`, `answers[{answer, aliases}]`,
    `compositionality_type`)."""
    return Loaded([
        Question(id=row["ID"], query=row["question"], question=row["question"],
                 answers=_unique(chain.from_iterable([a["answer"], *a["aliases"]] for a in row["answers"])),
                 type=row.get("compositionality_type", ""))
        for row in rows], [])


FORMATS: dict[str, Callable[[Any], Loaded]] = {
    "squad": read_squad,
    "hotpotqa": read_hotpotqa,
    "ircot": read_ircot,
    "popqa": read_popqa,
    "flashrag": read_flashrag,
    "aliases": read_aliases,
    "cwq": read_cwq,
}


def read_passages_file(path: str) -> list[Passage]:
    """A user corpus: JSONL or TSV (e.g. DPR's psgs_w100.tsv) with `id`, `text` and `title`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"corpus file not found: {path} (give a .jsonl or .tsv of id, title, text)")
    if file.suffix not in (".jsonl", ".tsv"):
        raise UsageError(f"corpus {path} must be a .jsonl or .tsv file of id, title, text")
    rows = read_rows(file)
    missing = {"id", "text", "title"} - set(rows[0] if rows else {})
    if missing:
        raise UsageError(f"corpus {path} lacks the column(s) {', '.join(sorted(missing))}; "
                         "each passage needs id, title and text")
    return [Passage(id=str(row["id"]), title=row["title"], text=row["text"]) for row in rows]


def deduplicate(passages: Iterable[Passage]) -> list[Passage]:
    """Passages with the same id (same title and text) kept once, in first-seen order."""
    return list({p.id: p for p in passages}.values())


def interleave_by_type(questions: Sequence[Question], per_type: int | None) -> list[Question]:
    """The first `per_type` questions of each type (all when None), taken round-robin over the
    types in order of first appearance, so any prefix is balanced across types."""
    by_type: dict[str, list[Question]] = defaultdict(list)
    for question in questions:
        by_type[question.type].append(question)
    columns = [group[:per_type] for group in by_type.values()]
    return [q for row in zip_longest(*columns) for q in row if q is not None]


# --------------------------------------------------------------------------- the task family


class QATask(Task):
    """Open-domain QA: EM / F1 over gold aliases, recall@k of the retrieved passages, and the
    same broken down by question type."""

    family = "qa"
    augmenter_method = "answer"
    description = "open-domain question answering: EM / F1 over aliases, retrieval recall@k"
    higher_is_better = {"em": True, "f1": True, "recall@k": True}  # every recall@{k} key
    options = {
        "corpus": Option(str, "", "a .jsonl/.tsv of id, title, text passages (e.g. DPR's "
                                  "psgs_w100.tsv) replacing the task's retrieval corpus"),
    }

    def _data_file(self, name_key: str) -> Path:
        data = self.config["data"]
        return Path(self.data_dir) / data["folder"] / data[name_key]

    def _read(self, fmt: str, rows: Any) -> Loaded:
        if fmt not in FORMATS:
            raise UsageError(f"task {self.name}: unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        return FORMATS[fmt](rows)

    @cached_property
    def loaded(self) -> Loaded:
        """The whole file, read once: questions (with side-file aliases and types) and contexts."""
        if self.data_dir is None:
            return self._read_hub()
        data = self.config["data"]
        path = self._data_file("file")
        if not path.is_file():
            raise UsageError(f"task {self.name} needs {path} ({data.get('get', 'see the task YAML')}); "
                             "set RAGHUB_DATA_DIR to the folder holding it")
        loaded = self._read(data["format"], read_rows(path))
        if data.get("aliases_file") and self._data_file("aliases_file").is_file():
            self._add_aliases(loaded.questions, read_aliases(read_rows(self._data_file("aliases_file"))))
        if data.get("types_file") and self._data_file("types_file").is_file():
            type_of = {row["question"]: row["type"] for row in read_rows(self._data_file("types_file"))}
            loaded.questions = [replace(q, type=type_of.get(q.question, q.type)) for q in loaded.questions]
        return loaded

    @staticmethod
    def _add_aliases(questions: list[Question], alias_source: Loaded) -> None:
        """Extend each question's answers with the aliases listed for the same question text."""
        aliases = {q.question: q.answers for q in alias_source.questions}
        for question in questions:
            question.answers = _unique([*question.answers, *aliases.get(question.question, [])])

    def _read_hub(self) -> Loaded:
        hub = self.config.get("hub")
        if not hub:
            data = self.config["data"]
            raise UsageError(f"task {self.name} has no hub source: set RAGHUB_DATA_DIR to a folder "
                             f"with {data['folder']}/{data['file']} ({data.get('get', '')})")
        import datasets

        rows = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"])
        return self._read(hub["format"], list(rows))

    def examples(self, model, limit: int | None) -> list[Question]:
        """The sample the YAML names (first N of the file, or first N per question type,
        interleaved by type), cut to `limit` when given, with the prompt template attached."""
        sample = self.config.get("sample", {})
        questions = self.loaded.questions
        if "per_type" in sample:
            questions = interleave_by_type(questions, sample["per_type"] if limit is None else None)
        ordered = questions[: limit or sample.get("first")]
        style = self.config.get("prompt", "chat")
        if style not in TEMPLATE_STYLES:
            raise UsageError(f"task {self.name}: prompt must be one of {', '.join(TEMPLATE_STYLES)}")
        template = PromptTemplate(
            style=style, chat=model.chat_prompt if style == "chat" else None,
            few_shot=tuple((shot["question"], shot["answer"]) for shot in self.config.get("few_shot", [])))
        max_new_tokens = int(self.config.get("max_new_tokens", 32))
        return [replace(q, template=template, max_new_tokens=max_new_tokens) for q in ordered]

    def corpus(self) -> tuple[list[Passage], str]:
        if self.settings["corpus"]:
            passages = read_passages_file(self.settings["corpus"])
            return passages, f"user corpus {self.settings['corpus']} ({len(passages)} passages)"
        if self.config.get("corpus_from"):
            return self._stand_in_corpus(self.config["corpus_from"])
        passages = deduplicate(self.loaded.passages)
        return passages, (f"{self.name} context paragraphs, pooled over the loaded file and "
                          f"de-duplicated ({len(passages)} passages)")

    def _stand_in_corpus(self, task_names: Sequence[str]) -> tuple[list[Passage], str]:
        """The other QA tasks' pooled passages: a small Wikipedia stand-in for datasets that
        ship no contexts."""
        from raghub.plugin_manager import registry

        tasks = registry().tasks
        unknown = [name for name in task_names if name not in tasks]
        if unknown:
            raise UsageError(f"task {self.name}: corpus_from names unknown task(s) {', '.join(unknown)}")
        pooled = chain.from_iterable(
            QATask(name, tasks[name], self.data_dir).loaded.passages for name in task_names)
        passages = deduplicate(pooled)
        return passages, (f"stand-in corpus: the de-duplicated context paragraphs of "
                          f"{', '.join(task_names)} ({len(passages)} passages; no Wikipedia dump "
                          "here, --corpus replaces it)")

    def evaluate(self, augmenter, examples: Sequence[Question],
                 retrieved: Sequence[Sequence[Retrieved]]) -> list[dict[str, Any]]:
        predictions = augmenter.answer(examples, retrieved)
        return [question_stats(q, prediction, docs)
                for q, prediction, docs in zip(examples, predictions, retrieved)]

    def aggregate(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return aggregate_stats(stats)


def question_stats(question: Question, prediction: str,
                   retrieved: Sequence[Retrieved]) -> dict[str, Any]:
    """One question's record line: the prediction, EM and F1 (best alias), recall@k."""
    stats = {"id": question.id, "type": question.type, "prediction": prediction,
             "em": best_over_aliases(exact_match, prediction, question.answers),
             "f1": best_over_aliases(f1, prediction, question.answers)}
    recall = question.recall(retrieved) if retrieved else None
    if recall is not None:
        stats[f"recall@{len(retrieved)}"] = recall
    return stats


def aggregate_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of em, f1 and each recall@k, `n_questions`, and `by_type` em / f1 / count."""
    metrics: dict[str, Any] = {"em": mean(s["em"] for s in stats), "f1": mean(s["f1"] for s in stats)}
    recall_keys = sorted({key for s in stats for key in s if key.startswith("recall@")})
    for key in recall_keys:
        metrics[key] = mean(s[key] for s in stats if key in s)
    metrics["n_questions"] = len(stats)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in stats:
        groups[s["type"]].append(s)
    if any(groups.keys() - {""}):
        metrics["by_type"] = {
            kind: {"em": mean(s["em"] for s in group), "f1": mean(s["f1"] for s in group),
                   "count": len(group)}
            for kind, group in sorted(groups.items())}
    return metrics


@hookimpl
def register_task_families(register):
    register(QATask)
