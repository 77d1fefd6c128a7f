"""`lm`: the run's model as an unsupervised passage reranker (UPR, Sachan et al. 2022). Each
candidate is scored by the mean log p(question tokens | passage) under the model, with UPR's
prompt, all of a batch's pairs in one `continuation_logprobs` call."""

from __future__ import annotations

from typing import Any, Sequence

from raghub import Passage, Reranker, hookimpl

#: UPR's prompt; the question follows it, after a space
PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


class LMReranker(Reranker):
    name = "lm"
    description = "UPR: the run's model scores each passage by mean log p(question | passage)"
    requires = frozenset({"continuation_logprobs"})

    def fingerprint(self) -> dict[str, Any]:
        """Its name, and the weights and dtype of the model that scores."""
        return {**super().fingerprint(), "model": self.model.fingerprint, "dtype": self.model.dtype}

    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[Passage]]) -> list[list[float]]:
        pairs = [(PROMPT.format(passage=passage.as_text()), f" {query}")
                 for query, passages in zip(queries, candidates) for passage in passages]
        logprobs = iter(self.model.continuation_logprobs(*zip(*pairs)) if pairs else [])
        return [[float(next(logprobs).mean()) for _ in passages] for passages in candidates]


@hookimpl
def register_rerankers(register):
    register(LMReranker)
