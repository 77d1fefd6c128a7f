"""The `qa` task family: open-domain question answering scored by EM / F1 / match and retrieval
recall.

One YAML per dataset (`tasks/squad.yaml`, `hotpotqa.yaml`, `2wiki.yaml`, `popqa.yaml`,
`cwq.yaml`) names its file, the `format` that reads it (`formats.py`), the prompt template and
the sample. The retrieval corpus is the dataset's context passages pooled over the whole file and
de-duplicated; datasets without contexts pool the other QA tasks' passages instead
(`corpus_from`), and the `corpus` option replaces either with a user's corpus file (e.g. DPR's
psgs_w100.tsv).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from functools import cached_property
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from raghub import (Answer, Field, Option, Passage, PromptTemplate, Question, Retrieved, TEMPLATE_STYLES, Task,
                    UsageError, answer_match, answers_from, best_over_aliases, data_file, data_is_local,
                    exact_match, f1, file_sha256, load_hub_dataset, mean, notice, read_corpus, task_corpus)

from .formats import FORMATS, Loaded, Read, each_row, read_aliases, read_questions, read_rows, type_text, unique


T = TypeVar("T")
#: the per-question answer scores, each a mean over the questions
ANSWER_METRICS = ("em", "f1", "match")
#: the keys of a task YAML's `data:` that name files in its folder
DATA_FILE_KEYS = ("file", "aliases_file", "types_file")


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


def in_articles(questions: Sequence[Question], passages: Sequence[Passage], first: int, last: int) -> list[Question]:
    """The questions whose gold passage belongs to articles `first`..`last` (inclusive), the
    articles being the passages' titles numbered in order of first appearance."""
    titles = unique(p.title for p in passages)
    kept = set(titles[first : last + 1])
    title_of = {p.id: p.title for p in passages}
    return [q for q in questions if any(title_of.get(pid) in kept for pid in q.gold_passage_ids)]


# --------------------------------------------------------------------------- the task family


class QATask(Task):
    """Open-domain QA: EM / F1 / match over gold aliases, recall@k of the retrieved passages,
    and the same broken down by question type."""

    family = "qa"
    description = "open-domain question answering: EM / F1 / match over aliases, retrieval recall@k"
    higher_is_better = {"em": True, "f1": True, "match": True, "recall@k": True}  # every recall@{k} key
    entry_point = "answer"
    requires = frozenset({"generate"})
    options = {
        "corpus": Option(str, "", "a corpus file (.jsonl / .tsv of id, title, text, e.g. DPR's "
                                  "psgs_w100.tsv, or blank-line-separated text) replacing the "
                                  "task's retrieval corpus"),
    }
    definition_schema = {
        "data": Field({
            "folder": Field(str, help="the data directory's folder holding the files (`RAGHUB_DATA_DIR`, "
                                      "`--data-dir`); leave it out for `package` or paths of the file's own"),
            "package": Field(str, help="a Python package shipping the files (a plugin's own data)"),
            "file": Field(str, required=True, help="the questions' file: in `folder` or `package`, else a path "
                                                   "(relative to the YAML file); .json, .jsonl or .tsv"),
            "format": Field(tuple(FORMATS), required=True, help="how a row of `file` reads (below)",
                            choices={name: read.__doc__.split("\n\n")[0] for name, read in FORMATS.items()}),
            "aliases_file": Field(str, help="a file of more gold aliases per question text (format `aliases`), "
                                            "beside `file`"),
            "types_file": Field(str, help="a file of `{question, type}` rows giving each question's type"),
            "get": Field(str, help="where to get `file`, said when it is missing")},
            required=True, help="where the questions are read from: the data directory (else `hub`), a "
                                "package, or a path of the file's own"),
        "hub": Field({"path": Field(str, required=True, help="the `datasets.load_dataset` path"),
                      "name": Field(str, help="its configuration name"),
                      "split": Field(str, required=True, help="the split to read"),
                      "format": Field(tuple(FORMATS), required=True, help="as `data.format`")},
                     help="where the questions are read from without a data directory (the Hugging Face hub)"),
        "corpus_from": Field(list, help="QA tasks whose pooled context passages are the retrieval corpus, "
                                        "for a dataset that ships none (default: this task's own passages)"),
        "prompt": Field(TEMPLATE_STYLES, default="chat",
                        help="`chat`: the instruction and question in the model's chat template; `completion`: "
                             "plain text ending in `Answer:` (`_qa.yaml` sets it)"),
        "few_shot": Field(list, default=(), help="`{question, answer}` demonstrations placed first in every prompt"),
        "max_new_tokens": Field(int, at_least=1, default=32, help="tokens generated per answer at most"),
        "sample": Field({"first": Field(int, at_least=1, help="the first N questions of the file"),
                         "per_type": Field(int, at_least=1, help="the first N questions of each type, "
                                                                 "interleaved by type")},
                        default={}, help="which questions run (default: all); `--limit` cuts it further"),
        "articles": Field({"first": Field(int, required=True, at_least=0, help="the first article (0-based, "
                                                                               "in file order)"),
                           "last": Field(int, required=True, at_least=0, help="the last article (inclusive)")},
                          help="only the questions whose gold passage is in these articles; the corpus stays "
                               "the whole file's"),
    }

    def check(self) -> None:
        """Every data file the YAML names lies inside the data directory, and the questions are
        read (once, kept for the run), so that a missing or broken file stops a sweep before any
        of its runs starts."""
        if self._reads_files:
            for key in DATA_FILE_KEYS:
                if key in self.config["data"]:
                    self._data_file(key)
            self.loaded  # noqa: B018 (read for its errors)

    def fingerprint(self) -> dict[str, Any]:
        """The configuration and the sha256 of each data file it reads, so that a run after a
        file changed is a new run, never the stored one or a resume file's."""
        files = [key for key in DATA_FILE_KEYS if key in self.config["data"]] if self._reads_files else []
        return {**super().fingerprint(), "data_sha256": {key: file_sha256(path) for key in files
                                                         if (path := self._data_file(key)).is_file()}}

    @property
    def _reads_files(self) -> bool:
        """Whether the questions come from files (else from the hub): there is a data
        directory, or the YAML names files found without one."""
        return self.data_dir is not None or data_is_local(self.config["data"])

    def _data_file(self, name_key: str) -> Path:
        return data_file(self.config["data"], name_key, self.data_dir,
                         source=self.config.get("source", f"task {self.name}"))

    def _read(self, name_key: str, format_name: str, read: Callable[[Any], T]) -> list[T]:
        """`read` applied to each row of the data file `name_key` names (see `each_row`)."""
        path = self._data_file(name_key)
        return each_row(read_rows(path), str(path), format_name, read)

    @cached_property
    def loaded(self) -> Loaded:
        """The whole file, read once: questions (with side-file aliases and types) and contexts."""
        if not self._reads_files:
            return self._read_hub()
        data = self.config["data"]
        path = self._data_file("file")
        if not path.is_file():
            raise UsageError(f"task {self.name} needs {path} ({data.get('get', 'see the task YAML')}); "
                             "set RAGHUB_DATA_DIR to the folder holding it")
        loaded = read_questions(data["format"], read_rows(path), str(path))
        if data.get("aliases_file") and self._data_file("aliases_file").is_file():
            alias_rows = self._read("aliases_file", "aliases", read_aliases)
            self._check_matches("aliases_file", [q.question for q, _ in alias_rows], loaded.questions)
            self._add_aliases(loaded.questions, alias_rows)
        if data.get("types_file") and self._data_file("types_file").is_file():
            type_of = dict(self._read("types_file", "question-types",
                                      lambda row: (row["question"], type_text("type", row["type"]))))
            self._check_matches("types_file", type_of, loaded.questions)
            loaded.questions = [replace(q, type=type_of.get(q.question, q.type)) for q in loaded.questions]
        return loaded

    def _check_matches(self, name_key: str, texts: Iterable[str], questions: Sequence[Question]) -> None:
        """A side file (`name_key`) is matched by question text: one matching none of the
        questions (another dataset's or sample's) is a UsageError, not silently nothing added."""
        texts = set(texts)
        if not texts & {q.question for q in questions}:
            raise UsageError(f"{self._data_file(name_key)}: none of its {len(texts)} question texts is one of "
                             f"{self._data_file('file').name}'s {len(questions)}; it belongs to another dataset "
                             f"or sample: fix or remove data.{name_key} in the task YAML")

    @staticmethod
    def _add_aliases(questions: list[Question], alias_rows: Sequence[Read]) -> None:
        """Extend each question's answers with the aliases listed for the same question text."""
        aliases = {q.question: q.answers for q, _ in alias_rows}
        for question in questions:
            question.answers = unique([*question.answers, *aliases.get(question.question, [])])

    def _read_hub(self) -> Loaded:
        hub = self.config.get("hub")
        if not hub:
            data = self.config["data"]
            raise UsageError(f"task {self.name} has no hub source: set RAGHUB_DATA_DIR to a folder "
                             f"with {data['folder']}/{data['file']} ({data.get('get', '')})")
        rows = load_hub_dataset(self.name, hub["path"], hub.get("name"), hub["split"])
        return read_questions(hub["format"], list(rows), f"{hub['path']} ({hub['split']} split)")

    def examples(self, model, limit: int | None) -> list[Question]:
        """The sample the YAML names (first N of the file, or first N per question type,
        interleaved by type), cut to `limit` when given, with the prompt template attached."""
        sample = self.definition_value("sample")
        questions = self.loaded.questions
        if "articles" in self.config:
            questions = in_articles(questions, self.loaded.passages, **self.config["articles"])
        if "per_type" in sample:
            questions = interleave_by_type(questions, sample["per_type"] if limit is None else None)
        ordered = questions[: limit or sample.get("first")]
        style = self.definition_value("prompt")
        template = PromptTemplate(
            style=style, chat=model.chat_prompt if style == "chat" else None, model=model,
            few_shot=tuple((shot["question"], shot["answer"]) for shot in self.definition_value("few_shot")))
        max_new_tokens = self.definition_value("max_new_tokens")
        return [replace(q, template=template, max_new_tokens=max_new_tokens) for q in ordered]

    def corpus(self) -> tuple[list[Passage], str]:
        if self.settings["corpus"]:
            passages = read_corpus(self.settings["corpus"])
            return passages, f"user corpus {self.settings['corpus']} ({len(passages)} passages)"
        if self.config.get("corpus_from"):
            return self._stand_in_corpus(self.config["corpus_from"])
        passages = deduplicate(self.loaded.passages)
        self._say_missing_gold(passages)
        return passages, (f"{self.name} context paragraphs, pooled over the loaded file and "
                          f"de-duplicated ({len(passages)} passages)")

    def _say_missing_gold(self, passages: Sequence[Passage]) -> None:
        """Say how many questions name a gold passage (id or title) that `passages` lack: their
        recall can never reach 1, and nothing else would tell why."""
        ids, titles = {p.id for p in passages}, {p.title for p in passages}
        questions = self.loaded.questions
        lacking = sum(1 for q in questions
                      if not (ids.issuperset(q.gold_passage_ids) and titles.issuperset(q.gold_titles)))
        if lacking:
            notice(f"task {self.name}: {lacking} of {len(questions)} questions have gold passages that its corpus "
                   "lacks; recall counts them as not retrieved")

    def _stand_in_corpus(self, task_names: Sequence[str]) -> tuple[list[Passage], str]:
        """The other QA tasks' pooled passages: a small Wikipedia stand-in for datasets that
        ship no contexts."""
        tasks = self.registry.tasks
        unknown = [name for name in task_names if name not in tasks]
        if unknown:
            raise UsageError(f"task {self.name}: corpus_from names unknown task(s) {', '.join(unknown)}")
        pooled = chain.from_iterable(
            QATask(name, tasks[name], self.data_dir, self.registry).loaded.passages for name in task_names)
        passages = deduplicate(pooled)
        return passages, (f"stand-in corpus: the de-duplicated context paragraphs of "
                          f"{', '.join(task_names)} ({len(passages)} passages; no Wikipedia dump "
                          "here, --corpus replaces it)")

    def evaluate(self, method, examples: Sequence[Question],
                 retrieved: Sequence[Sequence[Retrieved]]) -> list[dict[str, Any]]:
        """Each question's stats; in a user's --corpus the task's gold passage ids mean
        nothing, so recall counts only gold titles there (none, or a corpus without titles: no
        recall). Recall is named by the passages the run asked for (`method.n_docs`), whatever
        a stage left of them (a question left none has recall 0)."""
        predictions = answers_from(method, examples, retrieved)
        if self.settings["corpus"]:
            titled = self._user_corpus_has_titles
            examples = [replace(q, gold_passage_ids=[], gold_titles=q.gold_titles if titled else [])
                        for q in examples]
        asked = method.n_docs if method.first_stage else None
        return [question_stats(q, prediction, docs, asked)
                for q, prediction, docs in zip(examples, predictions, retrieved)]

    @cached_property
    def _user_corpus_has_titles(self) -> bool:
        """Whether any passage of the --corpus file has a title (read up to the first that has)."""
        return any(passage.title for passage in task_corpus(self)[0])

    def aggregate(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return aggregate_stats(stats)

    @classmethod
    def metric_terms(cls, stats: dict[str, Any]) -> dict[str, tuple[float, float]]:
        """EM, F1, match and recall@k are means over the questions (recall@k over those with
        gold; match over those scored since it exists)."""
        return {key: (value, 1.0) for key, value in stats.items()
                if key in ANSWER_METRICS or key.startswith("recall@")}

    def sample_log(self, question: Question, line: dict[str, Any]) -> dict[str, Any]:
        """Adds the question, its gold answers, and whether each passage retrieved (first stage
        and the method's own calls) is gold."""
        for passage in [*line["retrieved"], *(hit for call in line.get("retrievals", ()) for hit in call["hits"])]:
            passage["gold"] = question.is_gold(passage["id"], passage["title"])
        return {"id": line["id"], "question": question.question, "answers": question.answers, **line}


def question_stats(question: Question, prediction: str, retrieved: Sequence[Retrieved],
                   k: int | None = None) -> dict[str, Any]:
    """One question's stats: the prediction (and the raw generation when the method returned
    an `Answer`, else None), EM, F1 and match (best alias), and recall@k of the passages read,
    k being the passages asked for (default: those given), so that a question a stage left
    fewer, or none, is counted under the same name as the others."""
    stats = {"id": question.id, "type": question.type, "prediction": str(prediction),
             "generation": prediction.generation if isinstance(prediction, Answer) else None,
             "em": best_over_aliases(exact_match, prediction, question.answers),
             "f1": best_over_aliases(f1, prediction, question.answers),
             "match": best_over_aliases(answer_match, prediction, question.answers)}
    recall = question.recall(retrieved) if retrieved or k else None
    if recall is not None:
        stats[f"recall@{k or len(retrieved)}"] = recall
    return stats


def _means(stats: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The mean of each answer metric over the questions that have it (match is missing from
    questions scored before it existed; none has it: left out)."""
    return {key: mean(s[key] for s in stats if key in s) for key in ANSWER_METRICS
            if any(key in s for s in stats)}


def aggregate_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of em, f1, match and each recall@k, `n_questions`, and `by_type` em / f1 / match /
    count."""
    metrics: dict[str, Any] = _means(stats)
    recall_keys = sorted({key for s in stats for key in s if key.startswith("recall@")})
    for key in recall_keys:
        metrics[key] = mean(s[key] for s in stats if key in s)
    metrics["n_questions"] = len(stats)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in stats:
        groups[s["type"]].append(s)
    if any(groups.keys() - {""}):
        metrics["by_type"] = {
            kind: {**_means(group), "count": len(group)}
            for kind, group in sorted(groups.items())}
    return metrics
