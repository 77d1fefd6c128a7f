"""The run's retrieval: one service over the task's corpus and the run's retriever, which both
the first stage (the runner's top-k per example) and a method's own calls (`Method.retrieve`)
go through.

Every search honours each query's excluded group (leave-one-article-out) and is cached on disk
by the corpus, the retriever, k and the queries, so an identical run asks the retriever nothing.
The stages after it (`raghub.stages.Stages`: more retrievers fused by reciprocal rank fusion, a
reranker, a refiner) run here too, each cached in its plugin's own cache by its inputs.
Under several ranks `open` and `first_stage` are collective (every rank calls them at the same
point: each prepares its share, rank 0 builds the index and searches first, the others read
its cache entries); `search` is not, since each rank's method asks for its own examples, as
often as it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections import Counter
from typing import Any, Sequence

from raghub import distributed
from raghub.cache import Cache, fingerprint, fingerprint_items
from raghub.distributed import notice
from raghub.errors import ReturnedWrong, amount
from raghub.interfaces import Example, Passage, Retrieved, Retriever, Task
from raghub.stages import Refiner, Reranker, Stages, reciprocal_rank_fusion
from raghub.worklog import WorkLog


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
        raise ReturnedWrong("retriever", retriever, f"{hits!r}; it must return one list of (position, score) pairs per query")
    if len(hits) != len(example_ids):
        raise ReturnedWrong("retriever", retriever, f"{amount(len(hits), 'result list')} for "
                                        f"{amount(len(example_ids), 'query', 'queries')}")
    checked = []
    for example_id, found in zip(example_ids, hits):
        if not isinstance(found, (list, tuple)) or not all(isinstance(hit, (list, tuple)) and len(hit) == 2
                                                           for hit in found):
            raise ReturnedWrong("retriever", retriever, f"{found!r} for the query of {example_id}; it must be a list of "
                                            "(position, score) pairs")
        for position, score in found:
            if not isinstance(position, numbers.Integral) or isinstance(position, bool) \
                    or not 0 <= position < n_passages:
                raise ReturnedWrong("retriever", retriever, f"position {position!r} for the query of {example_id}, and the "
                                                f"corpus has {amount(n_passages, 'passage')} (0 to {n_passages - 1})")
            if not isinstance(score, numbers.Real) or isinstance(score, bool):
                raise ReturnedWrong("retriever", retriever, f"score {score!r} for the query of {example_id}; a score is a number")
        checked.append([(int(position), float(score)) for position, score in found])
    return checked


class Retrieval:
    """The run's retriever over its task's corpus, with the stages after it (`Stages`: more
    retrievers fused, a reranker, a refiner)."""

    def __init__(self, task: Task, retriever: Retriever, cache: Cache, stages: Stages | None = None) -> None:
        self.passages, self.corpus_label, self.corpus_fingerprint = task_corpus(task)
        self.retriever = retriever
        self.cache = cache
        self.stages = stages or Stages()
        #: each retriever with the cache its results are kept in
        self.parts = [(retriever, cache), *((other, other.cache) for other in self.stages.others)]

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
        """Build or load each retriever's index (collective): each rank does its share of
        `prepare`, then rank 0 indexes first and the others load what it built."""
        for retriever, _ in self.parts:
            retriever.prepare(self.passages, self.corpus_fingerprint)
        distributed.barrier()  # every rank's share of the index's work is done
        with distributed.main_first():
            for retriever, _ in self.parts:
                retriever.index(self.passages, self.corpus_fingerprint)

    def first_stage(self, examples: Sequence[Example], k: int, work: WorkLog | None = None) -> list[list[Retrieved]]:
        """The top-k of each example's own query (collective): rank 0 searches, the others
        read its cache entry."""
        with distributed.main_first():
            return self.search(examples, [e.query for e in examples], k, work)

    def search(self, examples: Sequence[Example], queries: Sequence[str], k: int,
               work: WorkLog | None = None) -> list[list[Retrieved]]:
        """Up to k passages per query (asked on behalf of the example beside it), best first, none
        of them in the example's excluded group and none for an empty query: each retriever's
        ranking (cached by corpus, retriever, depth and queries; what it returns is checked,
        `checked_hits`), fused, reranked and refined (each stage cached by its inputs; the
        tokens of the passages the refiner drops are noted in `work`, by example)."""
        k = min(k, len(self.passages))
        fetch = min(self.stages.fetch(k), len(self.passages))
        rankings = [self.ranked(retriever, cache, examples, queries, fetch) for retriever, cache in self.parts]
        fused = rankings[0] if len(rankings) == 1 else \
            [reciprocal_rank_fusion(lists, self.stages.fusion_k)[:fetch] for lists in zip(*rankings)]
        if self.stages.reranker is None:
            retrieved = [[Retrieved(self.passages[p], score) for p, score in hits[:k]] for hits in fused]
        else:
            retrieved = self.reranked(queries, fused, k)
        return retrieved if self.stages.refiner is None else self.refined(examples, queries, retrieved, work)

    def ranked(self, retriever: Retriever, cache: Cache, examples: Sequence[Example], queries: Sequence[str],
               k: int) -> list[list[tuple[int, float]]]:
        """`retriever`'s top-k (position, score) pairs of each query, outside the query's
        excluded group; none for an empty query. Cached in `cache`."""
        exclude_groups = [example.exclude_group for example in examples]
        asked = [i for i, query in enumerate(queries) if query.strip()]

        def search() -> list[list[tuple[int, float]]]:
            excluded = {exclude_groups[i] for i in asked} - {""}
            fetch = min(len(self.passages), k + max((self.group_sizes[g] for g in excluded), default=0))
            found = retriever.search([queries[i] for i in asked], fetch) if asked else []
            found = checked_hits(retriever, found, [examples[i].id for i in asked], len(self.passages))
            return [[(p, s) for p, s in hits if not self.passages[p].group
                     or self.passages[p].group != exclude_groups[i]][:k] for i, hits in zip(asked, found)]

        key = {"corpus": self.corpus_fingerprint, "retriever": retriever.fingerprint(), "k": k,
               "queries": fingerprint(list(zip(queries, exclude_groups)))}
        hits = cache.json("retrievals", key, search)
        ranked: list[list[tuple[int, float]]] = [[] for _ in queries]
        for i, found in zip(asked, hits):
            ranked[i] = [(p, float(score)) for p, score in found]
        return ranked

    def reranked(self, queries: Sequence[str], candidates: Sequence[Sequence[tuple[int, float]]],
                 k: int) -> list[list[Retrieved]]:
        """The top k of each query's candidates by the reranker's scores (equal scores in the
        first stage's order), each with its first-stage rank and score; the scores are cached
        by the reranker, the queries and the candidates."""
        reranker = self.stages.reranker
        asked = [i for i, hits in enumerate(candidates) if hits]

        def score() -> list[list[float]]:
            scores = reranker.score([queries[i] for i in asked],
                                    [[self.passages[p] for p, _ in candidates[i]] for i in asked])
            return checked_scores(reranker, scores, [len(candidates[i]) for i in asked])

        key = {"corpus": self.corpus_fingerprint, "reranker": reranker.fingerprint(),
               "candidates": fingerprint([(queries[i], [p for p, _ in candidates[i]]) for i in asked])}
        reranked: list[list[Retrieved]] = [[] for _ in queries]
        for i, scores in zip(asked, reranker.cache.json("reranked", key, score)):
            order = sorted(range(len(scores)), key=lambda n: -scores[n])[:k]
            reranked[i] = [Retrieved(self.passages[candidates[i][n][0]], float(scores[n]),
                                     first_rank=n + 1, first_score=candidates[i][n][1]) for n in order]
        return reranked

    def refined(self, examples: Sequence[Example], queries: Sequence[str], retrieved: Sequence[Sequence[Retrieved]],
                work: WorkLog | None) -> list[list[Retrieved]]:
        """Each query's passages with the text the refiner keeps, each with its tokens kept and
        retrieved (a passage it empties is dropped, its tokens retrieved noted in `work` for the
        query's example); cached by the refiner, the queries and the passages."""
        refiner = self.stages.refiner
        asked = [i for i, hits in enumerate(retrieved) if hits]

        def refine() -> list[list[list[Any]]]:
            texts = refiner.refine([queries[i] for i in asked], [[hit.passage for hit in retrieved[i]] for i in asked])
            texts = checked_texts(refiner, texts, [len(retrieved[i]) for i in asked])
            return [[[text, refiner.count_tokens(text), refiner.count_tokens(hit.passage.text)]
                     for text, hit in zip(kept, retrieved[i])] for i, kept in zip(asked, texts)]

        key = {"corpus": self.corpus_fingerprint, "refiner": refiner.fingerprint(),
               "passages": fingerprint([(queries[i], [hit.passage.id for hit in retrieved[i]]) for i in asked])}
        refined: list[list[Retrieved]] = [[] for _ in queries]
        for i, kept in zip(asked, refiner.cache.json("refined", key, refine)):
            refined[i] = [dataclasses.replace(hit, passage=dataclasses.replace(hit.passage, text=text),
                                              tokens_kept=tokens, tokens_retrieved=of)
                          for hit, (text, tokens, of) in zip(retrieved[i], kept) if text]
            if work is not None:
                work.add_dropped(examples[i], sum(of for text, _, of in kept if not text))
        return refined


def checked_scores(reranker: Reranker, scores: Any, sizes: Sequence[int]) -> list[list[float]]:
    """What `reranker.score` returned: one list of `sizes[i]` numbers per query, else a
    RunError naming the reranker's plugin."""
    if not isinstance(scores, (list, tuple)) or len(scores) != len(sizes) or not all(
            isinstance(found, (list, tuple)) and len(found) == size
            and all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in found)
            for found, size in zip(scores, sizes)):
        raise ReturnedWrong("reranker", reranker, f"{scores!r}; it must return one list of numbers per query, one "
                                       f"per candidate (candidates per query: {list(sizes)})")
    return [[float(s) for s in found] for found in scores]


def checked_texts(refiner: Refiner, texts: Any, sizes: Sequence[int]) -> list[list[str]]:
    """What `refiner.refine` returned: one list of `sizes[i]` strings per query, else a
    RunError naming the refiner's plugin."""
    if not isinstance(texts, (list, tuple)) or len(texts) != len(sizes) or not all(
            isinstance(kept, (list, tuple)) and len(kept) == size and all(isinstance(t, str) for t in kept)
            for kept, size in zip(texts, sizes)):
        raise ReturnedWrong("refiner", refiner, f"{texts!r}; it must return one list of strings per query, one per "
                                      f"passage (passages per query: {list(sizes)})")
    return [list(kept) for kept in texts]


def retrieve(task: Task, retriever: Retriever, examples: Sequence[Example], k: int,
             cache: Cache) -> tuple[list[list[Retrieved]], str, str]:
    """First-stage retrieval on its own (for benchmarks): the index opened, then the top-k of
    each example (k cut to the corpus size, with a notice). Returns (retrieved, corpus label,
    corpus fingerprint)."""
    retrieval = Retrieval(task, retriever, cache)
    retrieval.open()
    return retrieval.first_stage(examples, retrieval.clamp(k)), retrieval.corpus_label, retrieval.corpus_fingerprint
