"""`extractive`: RECOMP's extractive compressor (Xu et al. 2024) with an untrained encoder. The
sentences of a query's passages most similar to the query (cosine, by a sentence-transformers
encoder: the embedded all-MiniLM-L6-v2 by default) are kept while they fit in `--refine-tokens`
tokens of the run's model, and read in document order: passage by passage, each passage's
sentences in their order."""

from __future__ import annotations

import re
from typing import Sequence

from raghub import Option, Passage, Refiner, hookimpl
from raghub.kits.embedded import ENCODER_OPTION, EmbedsText

#: a sentence ends at . ! or ? followed by white space
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """`text`'s sentences, in order."""
    return [sentence for sentence in SENTENCE_END.split(text.strip()) if sentence]


class ExtractiveRefiner(EmbedsText, Refiner):
    name = "extractive"
    description = "keeps the sentences most similar to the question, up to --refine-tokens, in document order"
    options = {
        "refine_tokens": Option(int, 128, "tokens a refiner keeps (truncate: of each passage; extractive: "
                                          "of all the passages of a query)", at_least=1),
        "encoder": ENCODER_OPTION,
    }

    def refine(self, queries: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[list[str]]:
        return [self.extract(query, own) for query, own in zip(queries, passages)]

    def extract(self, query: str, passages: Sequence[Passage]) -> list[str]:
        """Each passage's kept sentences, joined in their order ('' where none is kept)."""
        split = [sentences(passage.text) for passage in passages]
        where = [(n, s) for n, own in enumerate(split) for s in range(len(own))]
        if not where:
            return ["" for _ in passages]
        similarity = self.embed([split[n][s] for n, s in where]) @ self.embed([query])[0]
        kept, used = set(), 0
        for index in sorted(range(len(where)), key=lambda i: -similarity[i]):
            cost = self.count_tokens(split[where[index][0]][where[index][1]])
            if used + cost <= self.settings["refine_tokens"]:
                kept.add(where[index])
                used += cost
        return [" ".join(sentence for s, sentence in enumerate(own) if (n, s) in kept) for n, own in enumerate(split)]


@hookimpl
def register_refiners(register):
    register(ExtractiveRefiner)
