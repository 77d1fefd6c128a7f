"""The run's retrieval: one service over the task's corpus and the run's retriever, which both
the first stage (the runner's top-k per example) and a method's own calls (`Method.retrieve`)
go through.

Every search honours each query's excluded group (leave-one-article-out) and is cached on disk
by the corpus, the retriever, k and the queries, so an identical run asks the retriever nothing.
Under several ranks `open` and `first_stage` are collective (every rank calls them at the same
point: each prepares its share, rank 0 builds the index and searches first, the others read
its cache entries); `search` is not, since each rank's method asks for its own examples, as
often as it needs.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Sequence

from raghub import distributed
from raghub.cache import Cache, fingerprint, fingerprint_items
from raghub.distributed import notice
from raghub.interfaces import Example, Passage, Retrieved, Retriever, Task


@functools.lru_cache(maxsize=4)
def task_corpus(task: Task) -> tuple[Sequence[Passage], str, str]:
    """The task's retrieval corpus, its label and its fingerprint, built once per task object
    (a streamed corpus file is hashed in one pass, without holding its passages)."""
    passages, label = task.corpus()
    return passages, label, fingerprint_items((p.id, p.title, p.text, p.group) for p in passages)


class Retrieval:
    """The run's retriever over its task's corpus."""

    def __init__(self, task: Task, retriever: Retriever, cache: Cache) -> None:
        self.passages, self.corpus_label, self.corpus_fingerprint = task_corpus(task)
        self.retriever = retriever
        self.cache = cache

    @functools.cached_property
    def group_sizes(self) -> Counter[str]:
        """The number of passages in each group: one pass over the corpus, made only when a
        query first excludes a group."""
        return Counter(passage.group for passage in self.passages if passage.group)

    def clamp(self, k: int) -> int:
        """`k`, cut to the corpus size with a notice when it is larger."""
        if k > len(self.passages):
            notice(f"--n-docs {k} is more than the corpus's {len(self.passages)} passages; "
                   f"retrieving {len(self.passages)}")
        return min(k, len(self.passages))

    def open(self) -> None:
        """Build or load the index (collective): each rank does its share of `prepare`, then
        rank 0 indexes first and the others load what it built."""
        self.retriever.prepare(self.passages, self.corpus_fingerprint)
        distributed.barrier()  # every rank's share of the index's work is done
        with distributed.main_first():
            self.retriever.index(self.passages, self.corpus_fingerprint)

    def first_stage(self, examples: Sequence[Example], k: int) -> list[list[Retrieved]]:
        """The top-k of each example's own query (collective): rank 0 searches, the others
        read its cache entry."""
        with distributed.main_first():
            return self.search([e.query for e in examples], [e.exclude_group for e in examples], k)

    def search(self, queries: Sequence[str], exclude_groups: Sequence[str], k: int) -> list[list[Retrieved]]:
        """Up to k passages per query, best first, none of them in the query's excluded group
        ('' = none) and none for an empty query; cached by corpus, retriever, k and queries."""
        k = min(k, len(self.passages))
        asked = [i for i, query in enumerate(queries) if query.strip()]

        def search() -> list[list[tuple[int, float]]]:
            excluded = {exclude_groups[i] for i in asked} - {""}
            fetch = min(len(self.passages), k + max((self.group_sizes[g] for g in excluded), default=0))
            found = self.retriever.search([queries[i] for i in asked], fetch) if asked else []
            return [[(p, s) for p, s in hits if not self.passages[p].group
                     or self.passages[p].group != exclude_groups[i]][:k] for i, hits in zip(asked, found)]

        key = {"corpus": self.corpus_fingerprint, "retriever": self.retriever.fingerprint(), "k": k,
               "queries": fingerprint(list(zip(queries, exclude_groups)))}
        hits = self.cache.json("retrievals", key, search)
        retrieved: list[list[Retrieved]] = [[] for _ in queries]
        for i, found in zip(asked, hits):
            retrieved[i] = [Retrieved(self.passages[p], float(score)) for p, score in found]
        return retrieved


def retrieve(task: Task, retriever: Retriever, examples: Sequence[Example], k: int,
             cache: Cache) -> tuple[list[list[Retrieved]], str, str]:
    """First-stage retrieval on its own (for benchmarks): the index opened, then the top-k of
    each example (k cut to the corpus size, with a notice). Returns (retrieved, corpus label,
    corpus fingerprint)."""
    retrieval = Retrieval(task, retriever, cache)
    retrieval.open()
    return retrieval.first_stage(examples, retrieval.clamp(k)), retrieval.corpus_label, retrieval.corpus_fingerprint
