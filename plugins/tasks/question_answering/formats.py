"""Dataset format readers: each turns one row of a QA data file into a `Question` (all gold
aliases as a list of texts, the question type, the gold passages when known) and the context
`Passage`s it ships; `read_questions` reads a file's rows with them, naming the row of any
error, and refuses a repeated question id."""

from __future__ import annotations

import io
import json
import math
import reprlib
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from raghub import (Passage, Question, UsageError, fingerprint, read_data_json, read_data_json_lines, read_data_text,
                    tsv_reader)

T = TypeVar("T")


@dataclass
class Loaded:
    """What a data file holds: the questions, and the context passages (duplicates kept)."""

    questions: list[Question]
    passages: list[Passage]


#: what a format's reader makes of one row: its question and the context passages it ships
Read = tuple[Question, list[Passage]]


def make_passage(title: str, text: str) -> Passage:
    """A passage whose id is derived from its content, so duplicates share an id."""
    return Passage(id=fingerprint(title, text)[:16], title=title, text=text)


def unique(values: Iterable[str]) -> list[str]:
    """The non-empty values, each once, in first-seen order."""
    return list(dict.fromkeys(v for v in values if v))


def is_finite_number(value: Any) -> bool:
    """An int or a finite float, not a bool (pandas fills a missing cell with NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class BadRow(ValueError):
    """What is wrong with one row of a data file (the reader adds the file and row)."""


def _texts(field: str, value: Any) -> list[str]:
    """A text or a list of texts as a list; a number is written out (an id-like answer such as
    75001), anything else (null, NaN, a mapping, a nested list, true / false) is a `BadRow`."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) or is_finite_number(item) for item in items):
        raise BadRow(f"'{field}' must be a text or a list of texts, not {reprlib.repr(value)}")
    return [str(item) for item in items]


def answer_list(field: str, *values: Any) -> list[str]:
    """A question's gold answers from the `values` of its answer field (each a text or a list of
    texts): every text that is not blank, once (a blank one normalises to the empty text, which an
    empty prediction would match). None left (an empty list, only blank texts) is a `BadRow`,
    since the question could never be answered right."""
    answers = unique(text for text in chain.from_iterable(_texts(field, value) for value in values) if text.strip())
    if not answers:
        raise BadRow(f"'{field}' holds no answer")
    return answers


def question_text(field: str, value: Any) -> str:
    """A question's text; anything else (null, NaN, a number, only blanks) is a `BadRow`, since
    the model would be asked "None" or nothing and scored as usual."""
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"'{field}' must be the question's text, not {reprlib.repr(value)}")
    return value


def type_text(field: str, value: Any) -> str:
    """A question's type as the row gives it ("" for none); null, NaN or a number is a `BadRow`,
    since the by-type table cannot group and order it beside the texts."""
    if not isinstance(value, str):
        raise BadRow(f"'{field}' must be the question's type as a text, not {reprlib.repr(value)}")
    return value


def read_rows(path: Path) -> Any:
    """A data file's rows: JSONL lines, a JSON list, a pandas column-oriented JSON object
    (turned into rows), SQuAD's nested JSON (flattened into rows), or TSV rows with a header.
    A file that is truncated, not UTF-8, empty or neither layout is a UsageError naming it."""
    if path.suffix == ".jsonl":
        return [row for _, row in read_data_json_lines(path)]
    if path.suffix == ".tsv":
        rows = tsv_reader(io.StringIO(read_data_text(path), newline=""))
        header = next(rows)
        return [dict(zip(header, values)) for values in rows if values]
    data = read_data_json(path)
    if isinstance(data, dict) and "data" in data:
        try:
            return squad_rows(data)
        except KeyError as error:
            raise UsageError(f"{path} is not SQuAD's nested layout: an entry has no {error}") from None
        except (TypeError, AttributeError):
            raise UsageError(f"{path} is not SQuAD's nested layout (data → paragraphs → qas)") from None
    if isinstance(data, dict):  # pandas `to_json()` column layout
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


def each_row(rows: Any, where: str, format_name: str, read: Callable[[Any], T]) -> list[T]:
    """`read` applied to every row; a row without a field `read` needs, of another shape, or
    with a field it refuses is a UsageError naming `where`, the row (1-based) and the field."""
    if not isinstance(rows, list):
        raise UsageError(f"{where} is not {format_name} data: it holds no list of rows; check the "
                         "task YAML's data.format")
    results = []
    for number, row in enumerate(rows, start=1):
        try:
            results.append(read(row))
        except BadRow as error:
            raise UsageError(f"{where}, row {number}: {error}") from None
        except KeyError as error:
            raise UsageError(f"{where} is not {format_name} data: row {number} has no {error}; check "
                             "the task YAML's data.format") from None
        except (TypeError, AttributeError, ValueError) as error:
            raise UsageError(f"{where} is not {format_name} data: row {number} ({error}); check the "
                             "task YAML's data.format") from None
    return results


def read_questions(format_name: str, rows: Any, where: str) -> Loaded:
    """The questions and context passages of a format's rows (`where` names their file); two
    questions with the same id, whose results would replace each other, are a UsageError."""
    read = FORMATS[format_name]
    questions, passages = [], []
    first_row: dict[str, int] = {}
    for number, (question, own) in enumerate(each_row(rows, where, format_name, read), start=1):
        if question.id in first_row:
            raise UsageError(f"{where}: rows {first_row[question.id]} and {number} have the same id "
                             f"{question.id!r}; each question needs its own")
        first_row[question.id] = number
        questions.append(question)
        passages += own
    return Loaded(questions, passages)


def read_squad(row: dict) -> Read:
    """SQuAD v1.1 (`id`, `title`, `context`, `question`, `answers.text`: the hub's flat rows, or the
    official nested JSON); gold = the question's paragraph.

    `read_rows` flattens the nested JSON."""
    passage = make_passage(row["title"].replace("_", " "), row["context"])
    question = question_text("question", row["question"])
    return Question(id=row["id"], query=question, question=question,
                    answers=answer_list("answers.text", row["answers"]["text"]),
                    gold_passage_ids=[passage.id]), [passage]


def _title_sentence_pairs(table: Any, second: str) -> list[tuple[str, Any]]:
    """HotpotQA's `[[title, x], ...]` (official) or `{"title": [...], second: [...]}` (hub)."""
    if isinstance(table, dict):
        return list(zip(table["title"], table[second]))
    return [(title, x) for title, x in table]


def read_hotpotqa(row: dict) -> Read:
    """The official HotpotQA layout, shared by 2WikiMultihopQA (`_id`/`_1`, `question`,
    `answer`, `type`, `context`, `supporting_facts`); gold = the supporting facts' titles."""
    passages = [make_passage(title, " ".join(s.strip() for s in sentences))
                for title, sentences in _title_sentence_pairs(row["context"], "sentences")]
    supporting = _title_sentence_pairs(row["supporting_facts"], "sent_id")
    question = question_text("question", row["question"])
    return Question(
        id=str(row.get("_id") or row.get("_1") or row["id"]), query=question,
        question=question, answers=answer_list("answer", row["answer"]),
        type=type_text("type", row.get("type", "")), gold_titles=unique(title for title, _ in supporting)), passages


def read_ircot(row: dict) -> Read:
    """IRCoT's processed HotpotQA (`question_id`, `question_text`, `answers_objects[].spans`,
    `contexts[]` with `is_supporting`); gold = the supporting contexts' titles."""
    question = question_text("question_text", row["question_text"])
    return Question(
        id=row["question_id"], query=question, question=question,
        answers=answer_list("answers_objects.spans", *(a["spans"] for a in row["answers_objects"])),
        gold_titles=unique(c["title"] for c in row["contexts"] if c["is_supporting"]),
    ), [make_passage(c["title"], c["paragraph_text"]) for c in row["contexts"]]


def read_popqa(row: dict) -> Read:
    """PopQA's official TSV / hub rows (`id`, `question`, `possible_answers`: a JSON list, as text,
    `prop`); type = the relation `prop`."""
    possible = row["possible_answers"]
    if isinstance(possible, str):
        try:
            possible = json.loads(possible)
        except json.JSONDecodeError:
            raise BadRow(f"'possible_answers' is not a JSON list of texts: {reprlib.repr(possible)}") from None
    question = question_text("question", row["question"])
    return Question(id=str(row["id"]), query=question, question=question,
                    answers=answer_list("possible_answers", possible), type=type_text("prop", row["prop"])), []


def read_flashrag(row: dict) -> Read:
    """FlashRAG's JSONL (`id`, `question`, `golden_answers`, `metadata.prop` for PopQA)."""
    question = question_text("question", row["question"])
    return Question(id=str(row["id"]), query=question, question=question,
                    answers=answer_list("golden_answers", row["golden_answers"]),
                    type=type_text("metadata.prop", row.get("metadata", {}).get("prop", ""))), []


def read_aliases(row: dict) -> Read:
    """Parametric RAG's alias lists `[{test_id, question, answer: str | [aliases]}]` (CWQ,
    and 2Wiki's alias side file)."""
    question = question_text("question", row["question"])
    return Question(id=str(row["test_id"]), query=question, question=question,
                    answers=answer_list("answer", row["answer"])), []


def read_cwq(row: dict) -> Read:
    """ComplexWebQuestions' official JSON (`ID`, `question`, `answers[{answer, aliases}]`,
    `compositionality_type`)."""
    texts = chain.from_iterable((a["answer"], a["aliases"]) for a in row["answers"])
    question = question_text("question", row["question"])
    return Question(id=row["ID"], query=question, question=question,
                    answers=answer_list("answers.answer / answers.aliases", *texts),
                    type=type_text("compositionality_type", row.get("compositionality_type", ""))), []


#: each format's reader of one row: the row's question and the context passages it ships
FORMATS: dict[str, Callable[[dict], Read]] = {
    "squad": read_squad,
    "hotpotqa": read_hotpotqa,
    "ircot": read_ircot,
    "popqa": read_popqa,
    "flashrag": read_flashrag,
    "aliases": read_aliases,
    "cwq": read_cwq,
}
