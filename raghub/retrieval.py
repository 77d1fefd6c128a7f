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
import numbers
from collections import Counter
from typing import Any, Sequence

from raghub import distributed
from raghub.cache import Cache, fingerprint, fingerprint_items
from raghub.distributed import notice
from raghub.errors import amount
from raghub.interfaces import Example, Passage, Retrieved, Retriever, Task
from raghub.plugin_manager import returned_wrong


@functools.lru_cache(maxsize=4)
def task_corpus(task: Task) -> tuple[Sequence[Passage], str, str]:
    """The task's retrieval corpus, its label and its fingerprint, built once per task object
    (a streamed corpus file is hashed in one pass, without holding its passages)."""
    passages, label = task.corpus()
    return passages, label, fingerprint_items((p.id, p.title, p.text, p.group) for p in passages)


def checked_hits(retriever: Retriever, hits: Any, example_ids: Sequence[str],
                  n_passages: int) -> list[list[tuple[int, float]]]:
    """What `retriever.search` returned for the queries of `example_ids`, as (position, score)
    lists; a RunError naming the retriever's plugin unless each position is in the corpus."""
    if not isinstance(hits, (list, tuple)):
        raise returned_wrong(retriever, f"{hits!r}; it must return one list of (position, score) pairs per query")
    if len(hits) != len(example_ids):
        raise returned_wrong(retriever, f"{amount(len(hits), 'result list')} for "
                                        f"{amount(len(example_ids), 'query', 'queries')}")
    checked = []
    for example_id, found in zip(example_ids, hits):
        if not isinstance(found, (list, tuple)) or not all(isinstance(hit, (list, tuple)) and len(hit) == 2
                                                           for hit in found):
            raise returned_wrong(retriever, f"{found!r} for the query of {example_id}; it must be a list of "
                                            "(position, score) pairs")
        for position, score in found:
            if not isinstance(position, numbers.Integral) or isinstance(position, bool) \
                    or not 0 <= position < n_passages:
                raise returned_wrong(retriever, f"position {position!r} for the query of {example_id}, and the "
                                                f"corpus has {amount(n_passages, 'passage')} (0 to {n_passages - 1})")
            if not isinstance(score, numbers.Real) or isinstance(score, bool):
                raise returned_wrong(retriever, f"score {score!r} for the query of {example_id}; a score is a number")
        checked.append([(int(position), float(score)) for position, score in found])
    return checked


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
            return self.search(examples, [e.query for e in examples], k)

    def search(self, examples: Sequence[Example], queries: Sequence[str], k: int) -> list[list[Retrieved]]:
        """Up to k passages per query (asked on behalf of the example beside it), best first, none
        of them in the example's excluded group and none for an empty query; cached by corpus,
        retriever, k and queries. What the retriever returns is checked (`checked_hits`)."""
        exclude_groups = [example.exclude_group for example in examples]
        k = min(k, len(self.passages))
        asked = [i for i, query in enumerate(queries) if query.strip()]

        def search() -> list[list[tuple[int, float]]]:
            excluded = {exclude_groups[i] for i in asked} - {""}
            fetch = min(len(self.passages), k + max((self.group_sizes[g] for g in excluded), default=0))
            found = self.retriever.search([queries[i] for i in asked], fetch) if asked else []
            found = checked_hits(self.retriever, found, [examples[i].id for i in asked], len(self.passages))
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
