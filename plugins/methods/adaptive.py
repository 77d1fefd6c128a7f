"""`adaptive`: retrieve only when the model is unsure of its answer (adaptive retrieval as in SKR,
Wang et al., 2023, "Self-Knowledge Guided Retrieval Augmentation for Large Language Models",
Findings of EMNLP, and Adaptive-RAG, Jeong et al., 2024, NAACL).

Every question is first answered closed book, with the task's prompt. When that answer's mean
token log-prob is below ln `--threshold` (its tokens' geometric-mean probability below the
threshold), the method retrieves `--n-docs` passages with the question and answers again with
them; otherwise the closed-book answer stands. The record's `method_stats` give the fraction of
questions that retrieved (`retrieved_fraction`).

What differs from the papers: SKR decides from the model's self-knowledge (its answers to
similar training questions) and Adaptive-RAG from a trained classifier of query complexity;
here the signal is the model's own confidence in its closed-book answer, with no training.
The threshold is a probability so that it means the same as `flare`'s.
"""

from __future__ import annotations

import math
from typing import Any

from raghub import Method, Option, hookimpl


class Adaptive(Method):
    name = "adaptive"
    families = frozenset({"qa"})
    description = "answers closed book, and retrieves only when that answer's tokens are unlikely"
    first_stage = False
    options = {
        "threshold": Option(float, 0.4, "a token probability below which the model counts as unsure (flare: any "
                                        "token of the next sentence; adaptive: the answer's geometric mean)",
                            above=0, at_most=1),
    }

    def answer(self, questions, retrieved):
        """One batched closed-book generation; then, for the unsure questions only, one batched
        retrieval and one batched generation with the passages."""
        max_new_tokens = max(q.max_new_tokens for q in questions)
        closed = self.generate(questions, [q.prompt([]) for q in questions], max_new_tokens, one_line=True)
        answers = [q.answer_from(g.text) for q, g in zip(questions, closed)]
        unsure = [q for q, g in zip(questions, closed) if not self.is_sure(g.token_logprobs)]
        if unsure:
            hits = self.retrieve(unsure, [q.query for q in unsure], self.n_docs)
            prompts = [q.prompt([hit.passage for hit in found]) for q, found in zip(unsure, hits)]
            again = dict(zip((q.id for q in unsure), self.generate(unsure, prompts, max_new_tokens, one_line=True)))
            answers = [q.answer_from(again[q.id].text) if q.id in again else a for q, a in zip(questions, answers)]
        self.counters["questions"] += len(questions)
        self.counters["retrieved"] += len(unsure)
        return answers

    def is_sure(self, token_logprobs) -> bool:
        """Whether the tokens' mean log-prob reaches ln threshold (nothing generated: unsure)."""
        return bool(token_logprobs) and sum(token_logprobs) / len(token_logprobs) >= math.log(self.settings["threshold"])

    def run_stats(self) -> dict[str, Any]:
        """The fraction of questions that retrieved."""
        questions = self.counters["questions"]
        return {"retrieved_fraction": self.counters["retrieved"] / questions} if questions else {}


@hookimpl
def register_methods(register):
    register(Adaptive)
