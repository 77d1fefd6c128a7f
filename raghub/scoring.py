"""Answers made by another system, scored as a run of a task (`raghub score`).

The predictions file holds one JSON object per line, one line per question: its `id`, its
`prediction` (the answer text) and optionally `retrieved`, the ids of the passages of the
task's corpus the system used, best first. The task scores them with its own `evaluate`, as if
a method had given those answers (question answering: EM, F1, match, and recall@k when passage
ids are given), and they are stored as a normal record and samples log whose method is the
system's name, so the system takes its place on the leaderboard. Every problem with the file
(a line that is no such object, an id that is no question of the task's sample, a question
without a prediction, an id given twice, a passage id not in the corpus) is counted in one line
before anything is written.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import raghub
from raghub.cache import file_sha256
from raghub.errors import UsageError, amount
from raghub.interfaces import Example, Method, Retrieved, Task
from raghub.plugin_manager import PluginHost
from raghub.record import Record
from raghub.records import append_record, check_store, samples_file
from raghub.retrieval import task_corpus
from raghub.provenance import git_commit, ranked_metrics, sample_line
from raghub.resolution import NoModel, question_task

#: the entry point of the task families whose predictions are answer texts
#: how many of the ids a problem concerns its line names
SHOWN_IDS = 3


@dataclass(frozen=True)
class Prediction:
    """One line of a predictions file."""

    id: str
    answer: str
    retrieved: tuple[str, ...] | None  # passage ids, best first; None: not given


def read_predictions(path: Path) -> list[Prediction]:
    """The file's predictions in file order; a UsageError naming the line that is not an object
    with a string `id` and `prediction` and, when given, a list of string `retrieved` ids."""
    try:
        rows = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    predictions = []
    for number, row in enumerate(rows, start=1):
        if not row.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(row)
        except ValueError:
            raise UsageError(f"{where} is not JSON; give one JSON object per line") from None
        if not (isinstance(value, dict) and isinstance(value.get("id"), str)
                and isinstance(value.get("prediction"), str)):
            raise UsageError(f'{where} must be an object with a string "id" and "prediction"')
        retrieved = value.get("retrieved")
        if retrieved is not None and not (isinstance(retrieved, list) and all(isinstance(i, str) for i in retrieved)):
            raise UsageError(f'{where}: "retrieved" must be a list of passage ids (strings)')
        predictions.append(Prediction(value["id"], value["prediction"],
                                      None if retrieved is None else tuple(retrieved)))
    return predictions


def _some(ids: Sequence[str]) -> str:
    """The first few of `ids`, e.g. 'q1, q2, q3, ...'."""
    return ", ".join(ids[:SHOWN_IDS]) + (", ..." if len(ids) > SHOWN_IDS else "")


def coverage_problems(predictions: Sequence[Prediction], question_ids: Sequence[str]) -> list[str]:
    """What keeps the predictions from being one answer per question of the sample: ids given
    twice, ids that are no question of it, questions without a prediction (each counted)."""
    counts, known = Counter(p.id for p in predictions), set(question_ids)
    duplicates = [i for i, count in counts.items() if count > 1]
    unknown = [i for i in counts if i not in known]
    missing = [i for i in question_ids if i not in counts]
    problems = []
    if duplicates:
        problems.append(f"{amount(len(duplicates), 'id')} given more than once ({_some(duplicates)})")
    if unknown:
        problems.append(f"{amount(len(unknown), 'id')} not among the task's questions ({_some(unknown)})")
    if missing:
        problems.append(f"{amount(len(missing), 'question')} without a prediction ({_some(missing)})")
    return problems


def retrieval_problems(predictions: Sequence[Prediction], corpus_ids: set[str]) -> list[str]:
    """What keeps the `retrieved` lists from being every question's top k of the corpus: given
    for only some questions, of different lengths, or naming passages the corpus lacks."""
    given = [p for p in predictions if p.retrieved is not None]
    if not given:
        return []
    problems = []
    if len(given) < len(predictions):
        problems.append(f'"retrieved" given for {len(given)} of {amount(len(predictions), "prediction")}; '
                        "give it for all or none")
    lengths = sorted({len(p.retrieved) for p in given})
    if len(lengths) > 1:
        problems.append(f'"retrieved" lists of {" and ".join(map(str, lengths))} passages; give every '
                        "question its top k for one k")
    unknown = list(dict.fromkeys(i for p in given for i in p.retrieved if i not in corpus_ids))
    if unknown:
        problems.append(f"{amount(len(unknown), 'passage id')} not in the task's corpus ({_some(unknown)})")
    return problems


class GivenAnswers(Method):
    """The predictions as a method: each question's answer is the one the file gives."""

    name = "predictions"
    needs_retrieval = False

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__(model=None, cache=None)
        self.answers = answers

    def answer(self, questions, retrieved):
        return [self.answers[q.id] for q in questions]


def score_predictions(host: PluginHost, task_spec: str, path: Path, system: str, results_dir: Path,
                      data_dir: str | None = None, limit: int | None = None) -> Record:
    """Score the predictions file against the task's sample (its first `limit` questions when
    given) and store the record and samples log; a UsageError, with nothing written, when the
    file does not give one prediction per question."""
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    task = question_task(task_spec, host.registry, data_dir, limit, "score")
    check_store(results_dir)
    examples: list[Example] = task.examples(NoModel(), limit)
    predictions = read_predictions(path)
    problems = coverage_problems(predictions, [e.id for e in examples])
    with_passages = any(p.retrieved is not None for p in predictions)
    corpus = {"label": None, "fingerprint": None}
    if with_passages:
        passages, label, corpus_fingerprint = task_corpus(task)
        by_id = {passage.id: passage for passage in passages}
        corpus = {"label": label, "fingerprint": corpus_fingerprint}
        problems += retrieval_problems(predictions, set(by_id))
    if problems:
        raise UsageError(f"{path}: {'; '.join(problems)}; nothing was scored")
    given = {p.id: p for p in predictions}
    # the samples log's scores: none were given, so each passage's is 0 (its rank is its order)
    retrieved = [[Retrieved(by_id[i], 0.0) for i in given[e.id].retrieved] if with_passages else []
                 for e in examples]
    stats = task.evaluate(GivenAnswers({i: p.answer for i, p in given.items()}), examples, retrieved)
    lines = [sample_line(task, e, s, r, {}) for e, s, r in zip(examples, stats, retrieved)]
    metrics = task.aggregate(lines)
    higher_is_better = ranked_metrics(task, metrics)
    standard_errors = task.standard_errors(lines)
    record_id = f"{started:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    record = Record(
        id=record_id, samples=samples_file(record_id), task=task.name,
        task_version=task.config.get("version", 1), family=task.family, method=system,
        n_docs=max(map(len, retrieved)), corpus=corpus["label"], n_examples=len(examples),
        metrics=metrics, higher_is_better=higher_is_better,
        stderr={name: standard_errors.get(name) for name in higher_is_better},
        config=_config(host, task, path, limit, corpus),
        plugins={"task family": host.registry.origin("task family", task.family)},
        raghub_version=raghub.__version__, git_commit=git_commit(), started_at=started.isoformat(),
        finished_at=datetime.now(timezone.utc).isoformat(), duration_s=round(time.perf_counter() - clock, 2))
    append_record(results_dir, record, lines)
    return record


def _config(host: PluginHost, task: Task, path: Path, limit: int | None, corpus: dict[str, Any]) -> dict[str, Any]:
    """What the scores depend on: the task, the predictions (file name and content) and the
    corpus their passage ids name."""
    return {"task": task.fingerprint(), "corpus": corpus, "limit": limit,
            "predictions": {"file": path.name, "sha256": file_sha256(path)},
            "code": {"task family": host.code_identity("task family", task.family)}}
