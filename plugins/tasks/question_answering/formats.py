"""Dataset format readers: each turns a QA data file's rows into `Question`s (all gold aliases,
the question type, the gold passages when known) and the context `Passage`s it ships."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable

from raghub import Passage, Question, UsageError
from raghub.cache import fingerprint
from raghub.settings import read_data_json, read_data_json_lines, read_data_text


@dataclass
class Loaded:
    """What a format reader returns: the questions, and the context passages (duplicates kept)."""

    questions: list[Question]
    passages: list[Passage]


def make_passage(title: str, text: str) -> Passage:
    """A passage whose id is derived from its content, so duplicates share an id."""
    return Passage(id=fingerprint(title, text)[:16], title=title, text=text)


def unique(values: Iterable[str]) -> list[str]:
    """The non-empty values, each once, in first-seen order."""
    return list(dict.fromkeys(v for v in values if v))


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def read_rows(path: Path) -> Any:
    """A data file's rows: JSONL lines, a JSON list, a pandas column-oriented JSON object
    (turned into rows), SQuAD's nested JSON (kept whole), or TSV rows with a header. A file
    that is truncated, not UTF-8, empty or neither layout is a UsageError naming it."""
    if path.suffix == ".jsonl":
        return [row for _, row in read_data_json_lines(path)]
    if path.suffix == ".tsv":
        return list(csv.DictReader(io.StringIO(read_data_text(path), newline=""), delimiter="\t"))
    data = read_data_json(path)
    if isinstance(data, dict) and "data" not in data:  # pandas `to_json()` column layout
        import pandas

        try:
            return pandas.DataFrame(data).to_dict("records")
        except ValueError:
            raise UsageError(f"{path} has no 'data' (SQuAD's nested layout) and is not a table of "
                             "columns (pandas' to_json layout)") from None
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
                                  answers=unique(row["answers"]["text"]),
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
            question=row["question"], answers=unique(_as_list(row["answer"])),
            type=row.get("type", ""), gold_titles=unique(title for title, _ in supporting)))
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
            answers=unique(answers),
            gold_titles=unique(c["title"] for c in row["contexts"] if c["is_supporting"])))
    return Loaded(questions, passages)


def read_popqa(rows: Any) -> Loaded:
    """PopQA's official TSV / hub rows: `possible_answers` is a JSON list; type = relation."""
    return Loaded([
        Question(id=str(row["id"]), query=row["question"], question=row["question"],
                 answers=unique(json.loads(row["possible_answers"])), type=row["prop"])
        for row in rows], [])


def read_flashrag(rows: Any) -> Loaded:
    """FlashRAG's JSONL (`id`, `question`, `golden_answers`, `metadata.prop` for PopQA)."""
    return Loaded([
        Question(id=str(row["id"]), query=row["question"], question=row["question"],
                 answers=unique(row["golden_answers"]),
                 type=row.get("metadata", {}).get("prop", ""))
        for row in rows], [])


def read_aliases(rows: Any) -> Loaded:
    """Parametric RAG's alias lists `[{test_id, question, answer: str | [aliases]}]` (CWQ,
    and 2Wiki's alias side file)."""
    return Loaded([
        Question(id=str(row["test_id"]), query=row["question"], question=row["question"],
                 answers=unique(_as_list(row["answer"])))
        for row in rows], [])


def read_cwq(rows: Any) -> Loaded:
    """ComplexWebQuestions' official JSON (`ID`, `question`, `answers[{answer, aliases}]`,
    `compositionality_type`)."""
    return Loaded([
        Question(id=row["ID"], query=row["question"], question=row["question"],
                 answers=unique(chain.from_iterable([a["answer"], *a["aliases"]] for a in row["answers"])),
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
