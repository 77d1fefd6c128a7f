"""The three interfaces every plugin implements: Task, Augmenter and Retriever.

A run is data flowing through them (see `raghub.runner`):

    task.examples(model) -> examples, each with a retrieval `query`
    retriever.search(queries, k) -> ranked (passage index, score) lists   [cached by the runner]
    task.evaluate(augmenter, examples, retrieved) -> one JSON-able stats dict per example
    task.aggregate(stats) -> the record's metrics

The core never looks inside an example: a task family defines its own example type and calls
the augmenter method that family needs (`score_windows` for language modelling, `answer` for
QA). An augmenter that does not support a family leaves that method unimplemented, which the
runner reports as a clear error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

if TYPE_CHECKING:  # pragma: no cover - imported for type names only
    import torch

    from raghub.cache import Cache
    from raghub.model import LanguageModel


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


@dataclass(frozen=True)
class Option:
    """A setting a plugin accepts; the CLI exposes it as `--name` (underscores become dashes).

    `type` is a Python type (int, float, str, bool) or a tuple of allowed strings; a number can
    be bounded by `at_least`, `at_most` (inclusive) and `above` (exclusive). Values are checked
    when the run is resolved, before any model loads.
    """

    type: Any
    default: Any
    help: str
    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None

    def convert(self, name: str, value: Any) -> Any:
        """`value` as this option's type (from the CLI or a config file), or a UsageError."""
        if value is None:
            return None
        if isinstance(self.type, tuple):
            if value not in self.type:
                raise UsageError(f"--{dashed(name)} must be one of {', '.join(self.type)}, not {value!r}")
            return value
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise UsageError(f"--{dashed(name)} must be true or false, not {value!r}")
        try:
            converted = self.type(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{dashed(name)} must be a {self.type.__name__}, not {value!r}") from None
        for bound, fails, words in ((self.at_least, lambda b: converted < b, "at least"),
                                    (self.at_most, lambda b: converted > b, "at most"),
                                    (self.above, lambda b: converted <= b, "above")):
            if bound is not None and fails(bound):
                raise UsageError(f"--{dashed(name)} must be {words} {bound:g}, not {converted}")
        return converted


def dashed(name: str) -> str:
    """An option name as the CLI spells it."""
    return name.replace("_", "-")


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
    """A passage as returned for one query, with the retriever's raw score."""

    passage: Passage
    score: float


@dataclass
class Example:
    """Base of every task family's example: an id, the retrieval query, and the group whose
    passages it must not retrieve ('' = none)."""

    id: str
    query: str
    exclude_group: str = ""


class Plugin:
    """Shared by tasks, augmenters and retrievers: a registered name and declared options."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the options given, each converted to its declared type
        (unknown keys are the caller's error)."""
        return {key: opt.convert(key, given[key]) if key in given else opt.default
                for key, opt in cls.options.items()}


class Retriever(Plugin, ABC):
    """Indexes a list of passages and returns the top-k for a batch of queries."""

    def __init__(self, cache: Cache, **options: Any) -> None:
        self.cache = cache
        self.settings = self.resolve_options(options)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes this retriever's results (used as a cache key)."""
        return {"retriever": self.name, **self.settings}

    @abstractmethod
    def index(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        """Build (or load from `self.cache`) the index over `passages`."""

    @abstractmethod
    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """For each query, up to k (passage position, raw score) pairs, best first."""


class Augmenter(Plugin):
    """A RAG method: turns the model and retrieved passages into what a task scores.

    `needs_retrieval` is False for closed-book methods; the runner then retrieves nothing.
    """

    needs_retrieval: ClassVar[bool] = True

    def __init__(self, model: LanguageModel, cache: Cache, **options: Any) -> None:
        self.model = model
        self.cache = cache
        self.settings = self.resolve_options(options)

    def score_windows(
        self, windows: Sequence[Any], retrieved: Sequence[Sequence[Retrieved]]
    ) -> list[torch.Tensor]:
        """Language modelling: natural-log probabilities of each window's scored tokens."""
        raise NotImplementedError

    def answer(
        self, questions: Sequence[Any], retrieved: Sequence[Sequence[Retrieved]]
    ) -> list[str]:
        """Question answering: one answer string per question."""
        raise NotImplementedError

    def run_stats(self) -> dict[str, Any]:
        """Method-specific numbers for the record (bytes sent, skipped passages, ...)."""
        return {}

    def close(self) -> None:
        """Release processes or connections the method opened."""


class Task(Plugin, ABC):
    """A benchmark: data, retrieval queries, scoring. Built from a YAML definition whose
    `family` names the Task subclass; `config` is that YAML, merged with CLI options."""

    family: ClassVar[str] = ""
    #: metric name -> True when higher is better (bold in the leaderboard)
    higher_is_better: ClassVar[dict[str, bool]] = {}
    #: the augmenter method this family calls, for error messages
    augmenter_method: ClassVar[str] = ""

    def __init__(self, name: str, config: dict[str, Any], data_dir: str | None, **options: Any):
        self.name = name  # type: ignore[misc]
        self.config = config
        self.data_dir = data_dir
        self.settings = self.resolve_options(options)

    def fingerprint(self) -> dict[str, Any]:
        """The task's full resolved configuration (part of every cache key and the record)."""
        return {"task": self.name, "config": self.config, **self.settings}

    @abstractmethod
    def examples(self, model: LanguageModel, limit: int | None) -> list[Example]:
        """The examples to evaluate, in a fixed order (the first `limit` when given)."""

    @abstractmethod
    def corpus(self) -> tuple[list[Passage], str]:
        """The retrieval datastore and a short label of what it is (stored in the record)."""

    @abstractmethod
    def evaluate(
        self,
        augmenter: Augmenter,
        examples: Sequence[Example],
        retrieved: Sequence[Sequence[Retrieved]],
    ) -> list[dict[str, Any]]:
        """Run the augmenter on a batch; one JSON-serialisable stats dict per example."""

    @abstractmethod
    def aggregate(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Combine per-example stats into the record's metrics (a flat dict of numbers,
        optionally with a nested `by_type` dict)."""


@dataclass
class Registry:
    """What the plugins registered, by kind, with where each came from."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_families: dict[str, type[Task]] = field(default_factory=dict)
    augmenters: dict[str, type[Augmenter]] = field(default_factory=dict)
    retrievers: dict[str, type[Retriever]] = field(default_factory=dict)
    origins: dict[tuple[str, str], str] = field(default_factory=dict)
