"""REPLUG's output mixture, the formula every ensemble-style method shares."""

from __future__ import annotations

from typing import Any


def mixture_logprobs(doc_logprobs: Any, scores: Any, temperature: float = 1.0) -> Any:
    """log p(y) = logsumexp_k(log softmax(scores / T)_k + log p_k(y)).

    `doc_logprobs` [..., K, T] are per-document token log-probs (a torch tensor), `scores`
    [..., K] the raw retrieval scores of the same K documents; returns [..., T].
    """
    import torch

    log_weights = torch.log_softmax(scores.to(doc_logprobs.dtype) / temperature, dim=-1)
    return torch.logsumexp(log_weights[..., None] + doc_logprobs, dim=-2)
