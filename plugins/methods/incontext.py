"""`incontext`: In-Context RALM / standard RAG: retrieved passages prepended to the prompt."""

from __future__ import annotations

from raghub import Method, answer_questions, hookimpl, passages_prefix, score_after_prefixes


class InContext(Method):
    name = "incontext"
    description = "In-Context RALM / standard RAG: retrieved passages prepended to the prompt"
    needs_retrieval = True
    families = frozenset({"language-modelling", "qa"})
    requires = frozenset()

    def score_windows(self, windows, retrieved):
        """The top-k passages, best first, each cut to the window's `retrieved_max_length`,
        joined before the context (DRAGON's "k_concat"; In-Context RALM with k = 1), as many as
        fit the model (`passages_prefix`)."""
        prefixes = [passages_prefix(self.model, w, docs) for w, docs in zip(windows, retrieved)]
        return score_after_prefixes(self.model, windows, prefixes)

    def answer(self, questions, retrieved):
        """Standard RAG: the top-k passages, best first, in each question's prompt."""
        return answer_questions(self.model, questions, [[r.passage for r in docs] for docs in retrieved])


@hookimpl
def register_methods(register):
    register(InContext)
