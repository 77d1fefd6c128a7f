"""`iter-retgen`: iterative retrieval-generation synergy (Shao et al., 2023, "Enhancing
Retrieval-Augmented Large Language Models with Iterative Retrieval-Generation Synergy",
Findings of EMNLP).

`--iterations N` rounds of retrieve, then generate: round 1 reads the question's first-stage
passages; the query of round t + 1 is the question followed by round t's generation, and its
`--n-docs` passages replace the previous round's in the prompt. The answer is the last round's.

What differs from the paper: each round generates with the task's own prompt and few-shot
demonstrations, a short answer rather than a chain of thought, so a query adds the model's
current answer, not its reasoning (the paper's Iter-RetGen generates chains of thought with
their answers).
"""

from __future__ import annotations

from raghub import Method, Option, hookimpl


class IterRetGen(Method):
    name = "iter-retgen"
    families = frozenset({"qa"})
    description = "Iter-RetGen: rounds of retrieve then generate, each query the question and the last generation"
    options = {
        "iterations": Option(int, 2, "rounds of retrieve then generate (1: standard RAG)", at_least=1, at_most=10),
    }

    def answer(self, questions, retrieved):
        """Each round one batched generation, and from round 2 on one batched retrieval first."""
        max_new_tokens = max(q.max_new_tokens for q in questions)

        def generate(passages):
            prompts = [q.prompt([hit.passage for hit in hits]) for q, hits in zip(questions, passages)]
            return self.generate(questions, prompts, max_new_tokens, one_line=True)

        generations = generate(retrieved)
        for _ in range(self.settings["iterations"] - 1):
            queries = [f"{q.question} {g.text.strip()}".strip() for q, g in zip(questions, generations)]
            generations = generate(self.retrieve(questions, queries, self.n_docs))
        return [q.answer_from(g.text) for q, g in zip(questions, generations)]


@hookimpl
def register_methods(register):
    register(IterRetGen)
