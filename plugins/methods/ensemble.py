"""`ensemble`: REPLUG / DRAGON output ensemble: one pass per passage, outputs mixed by retrieval weight."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

from raghub import Method, Option, generate_for, hookimpl, mean, mixture_logprobs, normalize_answer, passage_logprobs

if TYPE_CHECKING:  # pragma: no cover
    import torch


def normalised_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Retrieval scores as given ("none", DRAGON's choice) or z-scored over the K passages
    ("zscore"), which puts BM25's and cosine scores on one scale before the softmax."""
    if how == "zscore" and len(scores) > 1:
        return (scores - scores.mean()) / scores.std(correction=0).clamp_min(1e-6)
    return scores


def passage_weights(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """REPLUG's passage weights: softmax(retrieval scores / temperature)."""
    import torch

    return torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, dim=0).tolist()


def effective_passages(weights: Sequence[float]) -> float:
    """exp(entropy) of the passage weights: K for equal weights, 1 when one passage has them all."""
    return math.exp(-sum(w * math.log(w) for w in weights if w > 0))


def replug_answer_scores(answers: Sequence[str], token_logprobs: Sequence[Sequence[float]],
                         scores: Sequence[float], temperature: float = 1.0) -> dict[str, float]:
    """REPLUG for QA: answer k, generated with passage k, scores w_k · exp(mean token log-prob)
    with w = softmax(retrieval scores / temperature) (an empty answer, or one from an empty
    generation, scores 0); the scores of answers equal after SQuAD normalisation add up. Returns
    normalised answer -> total."""
    totals: dict[str, float] = defaultdict(float)
    for answer, logprobs, weight in zip(answers, token_logprobs, passage_weights(scores, temperature)):
        normalised = normalize_answer(answer)
        totals[normalised] += (weight * math.exp(mean(logprobs))) if normalised and logprobs else 0.0
    return dict(totals)


def replug_vote(answers: Sequence[str], token_logprobs: Sequence[Sequence[float]],
                scores: Sequence[float], temperature: float = 1.0) -> str:
    """The answer whose group has the highest REPLUG total (ties: the higher-ranked passage's),
    spelled as its highest-ranked member; "" when there are no answers."""
    if not answers:
        return ""
    totals = replug_answer_scores(answers, token_logprobs, scores, temperature)
    best = max(totals, key=totals.__getitem__)  # first of equal totals = higher ranked
    return next(answer for answer in answers if normalize_answer(answer) == best)


class Ensemble(Method):
    """Mixes per-passage outputs by retrieval weight, and records how many passages the weights
    really mix: the mean effective number of passages over the examples that retrieved."""

    name = "ensemble"
    description = "REPLUG / DRAGON output ensemble: one pass per passage, outputs mixed by retrieval weight"
    needs_retrieval = True
    families = frozenset({"language-modelling", "qa"})
    requires = frozenset()
    options = {
        "temperature": Option(float, 1.0, "passage weights are softmax(score / temperature)", above=0),
        "score_norm": Option(("none", "zscore"), "none",
                             "retrieval scores as given (DRAGON) or z-scored per query"),
    }

    def _mixing_scores(self, docs) -> torch.Tensor:
        """The retrieved passages' scores as mixed (after --score-norm), noting the effective
        number of passages their weights give (when there are passages)."""
        import torch

        scores = normalised_scores(torch.tensor([r.score for r in docs] or [0.0], dtype=torch.float64),
                                   self.settings["score_norm"])
        if docs:
            self.counters["effective_passages"] += effective_passages(
                passage_weights(scores.tolist(), self.settings["temperature"]))
            self.counters["examples_mixed"] += 1
        return scores

    def run_stats(self):
        if not self.counters["examples_mixed"]:
            return {}
        return {"mean_effective_passages": self.counters["effective_passages"] / self.counters["examples_mixed"]}

    def score_windows(self, windows, retrieved):
        """REPLUG: every (window, passage) pair scored in one batched call, then each window's
        per-passage token log-probs mixed by its passages' weights. A window without passages
        (the first) is scored on its context alone."""
        return [mixture_logprobs(doc_logprobs, self._mixing_scores(docs), self.settings["temperature"])
                for (doc_logprobs, _), docs in zip(passage_logprobs(self.model, windows, retrieved), retrieved)]

    def answer(self, questions, retrieved):
        """REPLUG for QA: one greedy answer per (question, passage), generated in one batched
        call and stopped at the end of its line (the answer read, whose tokens alone are its
        confidence), then each question's answers voted by retrieval weight and confidence. A
        question without passages is answered closed book, as one passage of score 0."""
        pairs = [(q, [r.passage] if r else []) for q, docs in zip(questions, retrieved) for r in docs or [None]]
        generations = iter(generate_for(self.model, [q for q, _ in pairs], [p for _, p in pairs], one_line=True))
        answers = []
        for question, docs in zip(questions, retrieved):
            own = [next(generations) for _ in docs or [None]]
            answers.append(replug_vote(
                [question.answer_from(g.text) for g in own], [g.token_logprobs for g in own],
                self._mixing_scores(docs).tolist(), self.settings["temperature"]))
        return answers


@hookimpl
def register_methods(register):
    register(Ensemble)
