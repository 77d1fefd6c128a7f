"""`bm25` (bm25s) and `bm25-rank` (rank-bm25's BM25Okapi): one BM25, two backends.

Both score with BM25Okapi's formula,
    score(q, d) = sum over query tokens t of idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = max(0, ln((N - df(t) + 0.5) / (df(t) + 0.5)))
on the same tokens, so they return the same ranking with the same scores. rank-bm25's default
raises a negative idf to 0.25 x the mean idf (its `epsilon` floor), which bm25s cannot express;
both floor it at 0 here instead (bm25s' Robertson idf; `BM25Okapi(epsilon=0)`), so a word in
more than half of the passages adds nothing rather than outweighing rarer words.
"""

from __future__ import annotations

import json
import re
from array import array
from abc import abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from raghub import Option, Passage, Retriever, UsageError, hookimpl

WORD = re.compile(r"\w+")
#: describes `bm25_tokens` in cache keys: change it whenever the tokenisation changes
TOKENISER = "lower-case \\w+ words, bm25s STOPWORDS_EN removed, no stemming"


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    """bm25s' English stop-words."""
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def bm25_tokens(text: str) -> list[str]:
    """Lower-case word tokens without English stop-words (bm25s' list); no stemming."""
    ignored = stopwords()
    return [word for word in WORD.findall(text.lower()) if word not in ignored]


def top_k(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k highest (position, score) pairs, best first; equal scores in position order."""
    k = min(k, len(scores))
    if k <= 0:
        return []
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= threshold)
    best = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
    return [(int(position), float(scores[position])) for position in best]


class BM25Retriever(Retriever):
    """What both backends share: tokenisation, k1/b, caching, ranking."""

    options = {
        "k1": Option(float, 1.5, "BM25 term-frequency saturation (>= 0)", at_least=0),
        "b": Option(float, 0.75, "BM25 document-length normalisation (0 to 1)", at_least=0, at_most=1),
    }

    def __init__(self, cache, **options: Any) -> None:
        super().__init__(cache, **options)
        self.bm25_index: Any = None

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "tokeniser": TOKENISER}

    def index(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        def build(folder: Path) -> None:
            # passage by passage into 4-byte word ids: a streamed corpus is never held as text
            vocab: dict[str, int] = {}
            corpus_ids = [array("i", [vocab.setdefault(word, len(vocab)) for word in bm25_tokens(passage.as_text())])
                          for passage in passages]
            if not vocab:
                raise UsageError(f"{self.name}: the retrieval corpus has no words to index "
                                 "(no passages, or only stop-words); check the task's corpus")
            self.build(folder, corpus_ids, vocab)

        key = {"corpus": corpus_fingerprint, **self.fingerprint()}
        self.bm25_index = self.cache.get_or_build("bm25-index", key, build, self.load)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        if self.bm25_index is None:
            raise RuntimeError("index() must be called before search()")
        return [top_k(self.scores(bm25_tokens(query)), k) for query in queries]

    @abstractmethod
    def build(self, folder: Path, corpus_ids: list[array], vocab: dict[str, int]) -> None:
        """Save into `folder` the index of the passages' word ids (`vocab`: word -> id), as data
        files (no pickle)."""

    @abstractmethod
    def load(self, folder: Path) -> Any:
        """The backend's index object, read from `folder`."""

    @abstractmethod
    def scores(self, query_tokens: list[str]) -> np.ndarray:
        """The BM25 score of every passage for one tokenised query (float64)."""


class BM25S(BM25Retriever):
    name = "bm25"
    description = "BM25 (Okapi) on the bm25s library: sparse precomputed scores, fast"

    def build(self, folder: Path, corpus_ids: list[array], vocab: dict[str, int]) -> None:
        import bm25s

        # "atire" term frequency = BM25Okapi's tf * (k1 + 1) / (...); "robertson" idf floors at 0
        index = bm25s.BM25(
            k1=self.settings["k1"], b=self.settings["b"],
            method="atire", idf_method="robertson", dtype="float64",
        )
        index.index((corpus_ids, vocab), show_progress=False)
        index.save(folder, show_progress=False)

    def load(self, folder: Path) -> Any:
        import bm25s

        return bm25s.BM25.load(folder, mmap=True, show_progress=False)  # the score matrix stays on disk

    def scores(self, query_tokens: list[str]) -> np.ndarray:
        return self.bm25_index.get_scores_from_ids(self.bm25_index.get_tokens_ids(query_tokens))


class RankBM25(BM25Retriever):
    name = "bm25-rank"
    description = "BM25 (Okapi) on rank-bm25, the reference implementation (slow, pure Python)"

    def build(self, folder: Path, corpus_ids: list[array], vocab: dict[str, int]) -> None:
        # rank-bm25 cannot save its index except by pickle; load() rebuilds it from the tokens
        words = list(vocab)  # in id order
        corpus_tokens = [[words[i] for i in ids] for ids in corpus_ids]
        (folder / "corpus_tokens.json").write_text(json.dumps(corpus_tokens), encoding="utf-8")

    def load(self, folder: Path) -> Any:
        from rank_bm25 import BM25Okapi

        corpus_tokens = json.loads((folder / "corpus_tokens.json").read_text(encoding="utf-8"))
        return BM25Okapi(corpus_tokens, k1=self.settings["k1"], b=self.settings["b"], epsilon=0.0)

    def scores(self, query_tokens: list[str]) -> np.ndarray:
        return self.bm25_index.get_scores(query_tokens)


@hookimpl
def register_retrievers(register):
    register(BM25S)
    register(RankBM25)
