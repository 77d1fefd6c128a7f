"""`embedding`: the first stage's candidates scored again by a sentence-transformers encoder's
cosine similarity to the query (the embedded all-MiniLM-L6-v2 by default), which gives a lexical
first stage dense scores without a dense index of the whole corpus."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raghub import Passage, Reranker, hookimpl
from raghub.kits.embedded import ENCODER_OPTION, EmbedsText


class EmbeddingReranker(EmbedsText, Reranker):
    name = "embedding"
    description = "cosine similarity of query and passage by a sentence-transformers encoder"
    options = {
        "encoder": ENCODER_OPTION,
    }

    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[Passage]]) -> list[list[float]]:
        query_vectors = self.embed(queries)
        passage_vectors = iter(self.embed([p.as_text() for passages in candidates for p in passages]))
        return [[float(np.dot(query_vector, next(passage_vectors))) for _ in passages]
                for query_vector, passages in zip(query_vectors, candidates)]


@hookimpl
def register_rerankers(register):
    register(EmbeddingReranker)
