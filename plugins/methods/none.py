"""`none`: closed book: the model alone, no retrieval."""

from __future__ import annotations

from raghub import Method, answer_questions, hookimpl, score_after_prefixes


class ClosedBook(Method):
    name = "none"
    description = "closed book: the model alone, no retrieval"
    needs_retrieval = False
    families = frozenset({"language-modelling", "qa"})
    requires = frozenset()

    def score_windows(self, windows, retrieved):
        """Each window's targets given its own preceding context only."""
        return score_after_prefixes(self.model, windows, [[] for _ in windows])

    def answer(self, questions, retrieved):
        """Closed book: the question's prompt without passages."""
        return answer_questions(self.model, questions, [[] for _ in questions])


@hookimpl
def register_methods(register):
    register(ClosedBook)
