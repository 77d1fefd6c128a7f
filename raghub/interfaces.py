"""The interfaces every plugin implements: Task, Method (an augmenter) and Retriever.

A run is data flowing through them (see `raghub.runner`):

    task.examples(model) -> examples, each with a retrieval `query`
    retriever.search(queries, k) -> ranked (passage index, score) lists   [cached by the runner]
    task.evaluate(method, examples, retrieved) -> one JSON-able stats dict per example
        [the method may call self.retrieve(examples, queries, k) as it works]
    task.aggregate(stats) -> the record's metrics
    task.sample_log(example, line) -> the example's line in the run's samples log

Each task family calls the method entry point of its contract (`raghub.families`):
`score_windows` for language modelling (`Window`s), `answer` for QA (`Question`s). A method
declares the families it supports (`Method.families`), and task families and methods declare
the model capabilities they require (`requires`, see `raghub.models.CAPABILITIES`); the runner
checks both before anything loads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from raghub.data import default_data_dir
from raghub.errors import UsageError
from raghub.metrics import ratio_estimates
from raghub.options import Option
from raghub.schema import Field, check_schema
from raghub.settings import parse_key_values
from raghub.worklog import WorkLog

if TYPE_CHECKING:  # pragma: no cover - imported for type names only
    import torch

    from raghub.cache import Cache
    from raghub.families.lm import Window
    from raghub.families.qa import Question
    from raghub.models import Generation, LanguageModel
    from raghub.retrieval import Retrieval


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of text. `group` (an article, a source) lets a task forbid an
    example from retrieving passages of its own group (leave-one-article-out)."""

    id: str
    text: str
    title: str = ""
    group: str = ""

    def as_text(self) -> str:
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Retrieved:
    """A passage as returned for one query, with the retriever's raw score (the reranker's,
    when the run reranks)."""

    passage: Passage
    score: float
    #: when the run reranks: the passage's rank (from 1) and score in the first stage
    first_rank: int | None = None
    first_score: float | None = None
    #: when the run refines: the passage's tokens the refiner kept, of those retrieved
    tokens_kept: int | None = None
    tokens_retrieved: int | None = None


@dataclass
class Example:
    """Base of every task family's example: an id, the retrieval query, and the group whose
    passages it must not retrieve ('' = none)."""

    id: str
    query: str
    exclude_group: str = ""


class Plugin:
    """Shared by tasks, methods, retrievers and model backends: a name and declared options."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the options given, each converted to its declared type
        (unknown keys are the caller's error)."""
        return {key: opt.convert(key, given[key]) if key in given else opt.default
                for key, opt in cls.options.items()}

    @classmethod
    def parse_options(cls, text: str, flag: str, kind: str) -> dict[str, Any]:
        """`key=value,...` given to `flag` as this plugin's options, converted; a key it does
        not take is a UsageError naming the plugin as `kind` (e.g. "model backend")."""
        arguments = parse_key_values(text, flag)
        unknown = sorted(arguments.keys() - cls.options.keys())
        if unknown:
            raise UsageError(f"{flag}: {kind} '{cls.name}' has no option {', '.join(unknown)} "
                             f"(it takes: {', '.join(cls.options) or 'none'})")
        return {key: cls.options[key].convert(key, value, f"{flag} {key}") for key, value in arguments.items()}


class Retriever(Plugin, ABC):
    """Indexes a list of passages and returns the top-k for a batch of queries."""

    def __init__(self, cache: Cache, **options: Any) -> None:
        self.cache = cache
        self.settings = self.resolve_options(options)

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides its code that changes this retriever's results (part of the key of
        its cached indexes and results, and of a run's config): its name and options. The
        runner keys them by the plugin's code too (its distribution's version, or a hash of its
        source); override to add what neither says, e.g. the checksum of a file an option names."""
        return {"retriever": self.name, **self.settings}

    def prepare(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        """Work every rank of a sharded run does before rank 0 builds the index (e.g. its share
        of the passage embeddings); nothing by default."""

    @abstractmethod
    def index(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        """Build (or load from `self.cache`) the index over `passages`."""

    @abstractmethod
    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """For each query, up to k (passage position, raw score) pairs, best first."""


#: a count the core keeps among every run's method counters (`LanguageModel.drop_passages`):
#: retrieved passages left out, lowest-ranked first, of inputs too long for the model
PASSAGES_DROPPED = "passages_dropped_for_length"


class Method(Plugin):
    """A RAG method (the papers' "augmenter"): turns the model and the retrieved passages into
    what a task scores. `needs_retrieval` is False for closed-book methods; the run then has no
    retriever. `first_stage` is False for a method that asks for all its passages itself
    (`retrieve`): the runner then retrieves nothing before it runs."""

    needs_retrieval: ClassVar[bool] = True
    first_stage: ClassVar[bool] = True
    #: the task families (`Task.family`) it runs; None (a plugin that declares none): every
    #: family whose entry point (`Task.entry_point`) it overrides, and families that name none
    families: ClassVar[frozenset[str] | None] = None
    #: the model capabilities it needs beyond its task family's `requires`
    requires: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def supports(cls, task_class: type[Task]) -> bool:
        """Whether it runs tasks of `task_class`'s family (see `families`)."""
        if cls.families is not None:
            return task_class.family in cls.families
        if not task_class.entry_point:
            return True
        own = getattr(cls, task_class.entry_point, None)
        return own is not None and own is not getattr(Method, task_class.entry_point, None)

    def __init__(self, model: LanguageModel, cache: Cache, **options: Any) -> None:
        self.model = model
        self.cache = cache
        self.settings = self.resolve_options(options)
        #: additive counts of the work done (passages trained, bytes sent, ...); the runner
        #: keeps them with the finished examples, so a resumed run counts all of its work
        self.counters: Counter[str] = Counter()
        #: the run's --n-docs (0 without a retriever): the first stage's k, and the k a method that
        #: asks for its own passages (first_stage = False) is to ask for
        self.n_docs = 0
        self.retrieval: Retrieval | None = None
        #: each example's retrieval calls and generated tokens, for its samples-log line
        self.work = WorkLog()

    def bind_retrieval(self, retrieval: Retrieval, n_docs: int) -> None:
        """Make `retrieve` ask the run's retriever (the runner does, before the first batch)."""
        self.retrieval, self.n_docs = retrieval, n_docs

    def retrieve(self, examples: Sequence[Example], queries: Sequence[str], k: int) -> list[list[Retrieved]]:
        """Up to k passages per query, best first, query i asked on behalf of examples[i] (the
        same example may appear several times): never from that example's `exclude_group`,
        cached like the first stage, and logged in its samples-log line as its next step."""
        if self.retrieval is None:
            raise UsageError(f"method '{self.name}' calls retrieve, but it declares needs_retrieval = "
                             "False, so the run has no retriever; declare needs_retrieval = True")
        retrieved = self.retrieval.search(examples, queries, k, self.work)
        self.work.add_retrievals(examples, queries, retrieved)
        return retrieved

    def generate(self, examples: Sequence[Example], prompts: Sequence[str], max_new_tokens: int,
                 one_line: bool = False) -> list[Generation]:
        """The model's greedy continuations of `prompts` (with `one_line`, each may stop at its
        first line end), prompt i on behalf of examples[i], whose generated tokens are counted
        in its samples-log line."""
        generate = self.model.generate_line if one_line else self.model.generate
        generations = generate(prompts, max_new_tokens)
        self.work.add_generated(examples, generations)
        return generations

    def score_windows(
        self, windows: Sequence[Window], retrieved: Sequence[Sequence[Retrieved]]
    ) -> list[torch.Tensor]:
        """Language modelling: natural-log probabilities of each window's target tokens."""
        raise NotImplementedError

    def answer(
        self, questions: Sequence[Question], retrieved: Sequence[Sequence[Retrieved]]
    ) -> list[str]:
        """Question answering: one answer string per question."""
        raise NotImplementedError

    def run_stats(self) -> dict[str, Any]:
        """Method-specific numbers for the record, computed from `counters` (default: them)."""
        return dict(self.counters)

    def record_stats(self) -> dict[str, Any]:
        """The record's `method_stats`: `run_stats`, and the passages left out of inputs too long
        for the model when there were any (`PASSAGES_DROPPED`), whatever `run_stats` returns."""
        dropped = self.counters[PASSAGES_DROPPED]
        return {**self.run_stats(), **({PASSAGES_DROPPED: dropped} if dropped else {})}

    def close(self) -> None:
        """Release processes or connections the method opened."""


class Task(Plugin, ABC):
    """A benchmark: data, retrieval queries, scoring. Built from a YAML definition whose
    `family` names the Task subclass; `config` is that YAML, merged with CLI options."""

    family: ClassVar[str] = ""
    #: metric name -> True when higher is better (bold in the leaderboard)
    higher_is_better: ClassVar[dict[str, bool]] = {}
    #: the task YAML's family-specific keys (beyond name, family, description, ...)
    definition_schema: ClassVar[dict[str, Field]] = {}
    #: the `Method` entry point its `evaluate` calls ('': not declared)
    entry_point: ClassVar[str] = ""
    #: the model capabilities (`raghub.models.CAPABILITIES`) every method of the family needs
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, config: dict[str, Any], data_dir: str | None,
                 registry: Registry | None = None, **options: Any):
        """`data_dir` None: the data folder beside the checkout when there is one, else the hub."""
        self.name = name  # type: ignore[misc]
        self.config = config
        self.data_dir = data_dir if data_dir is not None else default_data_dir()
        self.registry = registry or Registry()
        self.settings = self.resolve_options(options)

    @classmethod
    def check_definition(cls, definition: dict[str, Any]) -> None:
        """UsageError naming the file and key when a task YAML does not fit the family's schema."""
        check_schema(definition, {**COMMON_TASK_KEYS, **cls.definition_schema},
                     definition.get("source", definition.get("name", "a task definition")))

    def check(self) -> None:
        """Checks across options and the definition, run before the model loads."""

    def definition_value(self, key: str) -> Any:
        """The YAML's value of a key of `definition_schema`, else the default it documents."""
        return self.config.get(key, self.definition_schema[key].default)

    def fingerprint(self) -> dict[str, Any]:
        """The task's full resolved configuration (part of every cache key and the record),
        without where its YAML file lies: the same task anywhere is the same run."""
        definition = {key: value for key, value in self.config.items() if key != "source"}
        return {"task": self.name, "config": definition, **self.settings}

    @abstractmethod
    def examples(self, model: LanguageModel, limit: int | None) -> list[Example]:
        """The examples to evaluate, in a fixed order (the first `limit` when given)."""

    @abstractmethod
    def corpus(self) -> tuple[list[Passage], str]:
        """The retrieval datastore and a short label of what it is (stored in the record)."""

    @abstractmethod
    def evaluate(self, method: Method, examples: Sequence[Example],
                 retrieved: Sequence[Sequence[Retrieved]]) -> list[dict[str, Any]]:
        """Run the method on a batch; one JSON-serialisable stats dict per example."""

    @abstractmethod
    def aggregate(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Combine per-example stats into the record's metrics (a flat dict of numbers,
        optionally with a nested `by_type` dict). Each example's stats come as its line of the
        samples log (`sample_log`), which holds them, so a samples log re-aggregates."""

    @classmethod
    def metric_terms(cls, stats: dict[str, Any]) -> dict[str, tuple[float, float]]:
        """One example's (y, x) for each metric that is a ratio of sums Σy / Σx over the
        examples (x = 1 for a mean). Standard errors and `raghub compare` are computed from
        these; a family without them gets neither."""
        return {}

    def standard_errors(self, stats: Sequence[dict[str, Any]]) -> dict[str, float | None]:
        """The standard error of each metric (None when it has none, e.g. one example): by
        the delta method for the ratio metrics of `metric_terms`."""
        terms = [self.metric_terms(s) for s in stats]
        return {name: se for name, (_, se) in ratio_estimates(terms).items()}

    def totals(self, stats: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Sums the metrics are computed from, kept in the record so runs can be re-aggregated
        (language modelling: nll, tokens, bytes); none by default."""
        return {}

    def sample_log(self, example: Example, line: dict[str, Any]) -> dict[str, Any]:
        """One example's line in the samples log. `line` holds its `id`, its stats and its
        `retrieved` passages (id, title, score, rank, best first); a family adds what a reader
        needs, such as the question or which passages are gold, and keeps the rest."""
        return line


#: keys every task YAML may hold, whatever its family
COMMON_TASK_KEYS = {
    "name": Field(str, required=True, help="the task's name: `--task NAME`, the records' `task`"),
    "family": Field(str, required=True, help="the task family that runs it (`raghub tasks` lists them)"),
    "description": Field(str, help="one line for `raghub tasks`"),
    "source": Field(str, help="the file it was read from, which errors name (set by `read_task_definition`)"),
    "retriever": Field(str, default="bm25", help="the retriever when the run gives no `--retriever`"),
    "n_docs": Field(int, default=4, at_least=0, help="passages per example when the run gives no `--n-docs`"),
    "version": Field(int, default=1, help="raise it when a change to the task changes its scores"),
}


def check_name_and_family(definition: dict[str, Any], where: str) -> None:
    """A task definition's `name` and `family`, the keys that choose its family's schema,
    checked before the family is looked up."""
    check_schema({key: definition[key] for key in ("name", "family") if key in definition},
                 {key: COMMON_TASK_KEYS[key] for key in ("name", "family")}, where)


@dataclass
class Registry:
    """What the plugins registered, by kind, with where each came from."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_families: dict[str, type[Task]] = field(default_factory=dict)
    methods: dict[str, type[Method]] = field(default_factory=dict)
    retrievers: dict[str, type[Retriever]] = field(default_factory=dict)
    rerankers: dict[str, type] = field(default_factory=dict)
    refiners: dict[str, type] = field(default_factory=dict)
    models: dict[str, type] = field(default_factory=dict)
    objectives: dict[str, type] = field(default_factory=dict)
    judges: dict[str, type] = field(default_factory=dict)
    #: (kind, name) -> the origin of the plugin that registered it ('built-in', 'dist version')
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
    #: (kind, name) -> the origin whose registration a later plugin replaced
    overrides: dict[tuple[str, str], str] = field(default_factory=dict)
    #: (kind, name) -> the name of the plugin that registered it, as the plugin manager knows it
    providers: dict[tuple[str, str], str] = field(default_factory=dict)

    def origin(self, kind: str, name: str) -> str:
        """Where a registered name came from, with the origin it replaced, if any."""
        replaced = self.overrides.get((kind, name))
        return self.origins[(kind, name)] + (f" (overrides {replaced})" if replaced else "")
