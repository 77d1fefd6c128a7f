"""CoZyRAG's penalties, as differentiable loss terms on the generator's distributions at the
answer's positions (teacher-forced). Each takes `logprobs` [T, V], the log-probabilities of
the T target positions of one sequence, and returns a scalar; `raghub train --penalty
repetition=0.1,keyword=0.1,length=0.05` adds them with these weights."""

from __future__ import annotations

from typing import Sequence

import torch


def repetition_unlikelihood(logprobs: torch.Tensor, ids: Sequence[int], n: int = 1) -> torch.Tensor:
    """Unlikelihood training (Welleck et al., 2020) against repeated n-grams: at position t,
    every token c ≠ y_t that would complete an n-gram already in y_<t is a negative candidate,
    penalised by −ln(1 − p(c | y_<t)); the mean over all candidates, 0 when there are none.
    With n = 1 the candidates are the tokens already written (token-level unlikelihood)."""
    terms = []
    for t in range(len(ids)):
        context = tuple(ids[t - n + 1 : t]) if n > 1 else ()
        if len(context) < n - 1:
            continue
        seen = {ids[j + n - 1] for j in range(t - n + 1) if tuple(ids[j : j + n - 1]) == context}
        for candidate in sorted(seen - {ids[t]}):
            terms.append(-torch.log1p(-logprobs[t, candidate].exp().clamp(max=1 - 1e-6)))
    return torch.stack(terms).mean() if terms else logprobs.sum() * 0


def keyword_mass(logprobs: torch.Tensor, keyword_ids: Sequence[int]) -> torch.Tensor:
    """Keyword stuffing: the expected share of the answer's tokens that repeat the question's
    keywords, mean_t Σ_{v ∈ keywords} p(v | y_<t) (the trainer leaves the gold answer's own
    tokens out of the keywords)."""
    if not keyword_ids:
        return logprobs.sum() * 0
    return logprobs[:, list(keyword_ids)].exp().sum(-1).mean()


def length_penalty(logprobs: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """Length: the expected share of the T positions at which the model is still writing,
    (1/T) Σ_t Π_{s≤t} (1 − p_s(stop)), p_s(stop) being the probability of ending (a stop
    token) at position s; lowered by ending answers sooner."""
    stop = logprobs[:, list(stop_ids)].exp().sum(-1).clamp(max=1.0)
    return torch.cumprod(1 - stop, dim=0).mean()

