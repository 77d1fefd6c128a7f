"""`ensemble`: REPLUG / DRAGON output ensemble: one pass per passage, outputs mixed by retrieval weight."""

from __future__ import annotations

import torch

from raghub.hookspecs import hookimpl
from raghub.interfaces import Augmenter, Option

from .language_modelling import passage_ids, score_after_prefixes
from .question_answering import generate_for, replug_vote


def mixture_logprobs(
    doc_logprobs: torch.Tensor, scores: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """REPLUG's mixture: log p(y) = logsumexp_k(log softmax(scores / T)_k + log p_k(y)).

    `doc_logprobs` [..., K, T] are per-document token log-probs, `scores` [..., K] the raw
    retrieval scores of the same K documents; returns [..., T].
    """
    log_weights = torch.log_softmax(scores.to(doc_logprobs.dtype) / temperature, dim=-1)
    return torch.logsumexp(log_weights[..., None] + doc_logprobs, dim=-2)


def normalised_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Retrieval scores as given ("none", DRAGON's choice) or z-scored over the K passages
    ("zscore"), which puts BM25's and cosine scores on one scale before the softmax."""
    if how == "zscore" and len(scores) > 1:
        return (scores - scores.mean()) / scores.std(correction=0).clamp_min(1e-6)
    return scores


class Ensemble(Augmenter):
    name = "ensemble"
    description = "REPLUG / DRAGON output ensemble: one pass per passage, outputs mixed by retrieval weight"
    needs_retrieval = True
    options = {
        "temperature": Option(float, 1.0, "passage weights are softmax(score / temperature)", above=0),
        "score_norm": Option(("none", "zscore"), "none",
                             "retrieval scores as given (DRAGON) or z-scored per query"),
    }

    def score_windows(self, windows, retrieved):
        """REPLUG: every (window, passage) pair scored in one batched call, then each window's
        per-passage token log-probs mixed by its passages' weights. A window without passages
        (the first) is scored on its context alone."""
        pairs = [(w, r) for w, docs in zip(windows, retrieved) for r in docs or [None]]
        prefixes = [passage_ids(self.model, r.passage, w.retrieved_max_length) if r else []
                    for w, r in pairs]
        per_passage = iter(score_after_prefixes(self.model, [w for w, _ in pairs], prefixes))
        mixed = []
        for docs in retrieved:
            doc_logprobs = torch.stack([next(per_passage) for _ in docs or [None]])
            scores = normalised_scores(torch.tensor([r.score for r in docs] or [0.0]),
                                       self.settings["score_norm"])
            mixed.append(mixture_logprobs(doc_logprobs, scores, self.settings["temperature"]))
        return mixed

    def answer(self, questions, retrieved):
        """REPLUG for QA: one greedy answer per (question, passage), generated in one batched
        call, then each question's answers voted by retrieval weight and confidence."""
        pairs = [(q, r.passage) for q, docs in zip(questions, retrieved) for r in docs]
        generations = iter(generate_for(self.model, [q for q, _ in pairs], [[p] for _, p in pairs]))
        answers = []
        for question, docs in zip(questions, retrieved):
            own = [next(generations) for _ in docs]
            answers.append(replug_vote(
                [question.extract(g.text) for g in own], [g.token_logprobs for g in own],
                [r.score for r in docs], self.settings["temperature"]))
        return answers


@hookimpl
def register_augmenters(register):
    register(Ensemble)
