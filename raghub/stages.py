"""The stages between the first-stage retriever and the method: hybrid retrieval (several
retrievers' rankings fused by reciprocal rank fusion), a reranker and a refiner.

    retrievers (`+`-joined) -> fused (RRF) -> reranked (top n_docs of --rerank-depth) -> refined

`Reranker` and `Refiner` are plugin kinds (hooks `register_rerankers`, `register_refiners`);
`raghub.retrieval.Retrieval` runs the stages for the first stage and for a method's own
`retrieve` calls alike, and caches each stage's work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from raghub.interfaces import Passage, Plugin, Retriever

if TYPE_CHECKING:  # pragma: no cover - type names only
    from raghub.cache import Cache
    from raghub.models import LanguageModel

#: reciprocal rank fusion's k (Cormack et al. 2009), the default of --fusion-k
FUSION_K = 60
#: the default --rerank-depth, as a multiple of the passages kept
DEPTH_PER_DOC = 4


def reciprocal_rank_fusion(rankings: Sequence[Sequence[tuple[int, float]]], k: int = FUSION_K) -> list[tuple[int, float]]:
    """The (position, score) rankings fused: each position scores Σ 1 / (k + rank) over the
    rankings that hold it (rank from 1), best first; equal scores keep the order in which the
    positions were first met, ranking by ranking."""
    fused: dict[int, float] = defaultdict(float)
    for ranking in rankings:
        for rank, (position, _) in enumerate(ranking, start=1):
            fused[position] += 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


class Stage(Plugin):
    """A reranker or a refiner: made with the run's model (loaded by then) and its own cache,
    which the core keys by the plugin's code."""

    #: the model capabilities (`raghub.models.CAPABILITIES`) it needs
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: LanguageModel, cache: Cache, **options: Any) -> None:
        self.model = model
        self.cache = cache
        self.settings = self.resolve_options(options)

    @classmethod
    def identity(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """What names this stage with these resolved options before the model loads (in the
        record's config, so in what recognises an identical stored run, and in its cache keys):
        its name and options; override to add what they do not say (e.g. the content of a model
        folder an option names)."""
        return {"name": cls.name, **settings}

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides its code that changes its results (part of its cache keys): its
        `identity`; override to add what depends on the run's model."""
        return self.identity(self.settings)


class Reranker(Stage, ABC):
    """Scores the first stage's candidates of each query again; the core keeps the best."""

    @abstractmethod
    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[Passage]]) -> list[list[float]]:
        """For each query, one score per candidate passage (higher is better)."""


class Refiner(Stage, ABC):
    """Shortens the passages a method reads (compression, extraction)."""

    @abstractmethod
    def refine(self, queries: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[list[str]]:
        """For each query, the text kept of each of its passages ('' drops the passage)."""

    def fingerprint(self) -> dict[str, Any]:
        """Its identity and the run's model, whose tokenizer counts (and cuts) what it keeps."""
        return {**super().fingerprint(), "model": self.model.fingerprint}

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as the run's model counts them."""
        return len(self.model.encode(text))


@dataclass
class Stages:
    """What runs after the first retriever: more retrievers (a hybrid, each with its own cache
    in `.cache`), fused with `fusion_k`, each fetching `depth` passages (None: 4 × k) when there
    is more than one retriever or a reranker; then the reranker and the refiner."""

    others: list[Retriever] = field(default_factory=list)
    fusion_k: int = FUSION_K
    depth: int | None = None
    reranker: Reranker | None = None
    refiner: Refiner | None = None

    def fetch(self, k: int) -> int:
        """How many passages each retriever fetches for a top-k."""
        if not self.others and self.reranker is None:
            return k
        return max(k, self.depth or DEPTH_PER_DOC * k)


@dataclass(frozen=True)
class StagePlan:
    """The stages a run asked for, resolved before the model loads: its retrievers (more than
    one: a hybrid), its reranker and refiner classes, the fusion's k and the depth each
    retriever fetches (None: 4 × k)."""

    retrievers: tuple[type[Retriever], ...]
    reranker: type[Reranker] | None = None
    refiner: type[Refiner] | None = None
    fusion_k: int = FUSION_K
    depth: int | None = None

    @property
    def label(self) -> str:
        """The retrievers' names, `+`-joined, as `--retriever` takes them."""
        return "+".join(cls.name for cls in self.retrievers)

    def kinds(self) -> dict[str, type[Plugin] | None]:
        """Each stage's plugin class by the kind its options are routed to: 'retriever' (the
        first retriever), 'retriever 2', ..., 'reranker', 'refiner'."""
        retrievers = {"retriever" if n == 0 else f"retriever {n + 1}": cls for n, cls in enumerate(self.retrievers)}
        return {**retrievers, "reranker": self.reranker, "refiner": self.refiner}

    def settings(self, options: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """What the record lists of the stages after the first retriever, with each stage's
        `identity` (its options, `options`: by kind); None when there are none."""
        hybrid = len(self.retrievers) > 1
        if not hybrid and self.reranker is None and self.refiner is None:
            return None
        stage = {kind: cls.identity(cls.resolve_options(options.get(kind, {}))) if cls else None
                 for kind, cls in (("reranker", self.reranker), ("refiner", self.refiner))}
        fetched = hybrid or self.reranker is not None
        return {"retrievers": [cls.name for cls in self.retrievers], "fusion_k": self.fusion_k if hybrid else None,
                "rerank_depth": (self.depth or f"{DEPTH_PER_DOC} x k") if fetched else None, **stage}
