"""RAG's marginal likelihoods and training losses: pure torch formulas, and the `Objective`
plugin kind (registered through `register_objectives`) that `raghub train` minimises.

The `rag-sequence` method and the training plugin both use these, and import only the core.
Shapes: `scores` [..., K] are raw retrieval scores of the top-K passages; `doc_logprobs`
[..., K, T] are ln p_θ(y_t | f(x, z_k), y_<t) of the target's tokens under each passage, with
0 at padding positions (a padded token then adds nothing to any of the formulas below).
"""

from __future__ import annotations

from typing import Any, ClassVar

from raghub.interfaces import Plugin
from raghub.mixture import mixture_logprobs


def passage_log_weights(scores: Any, temperature: float = 1.0) -> Any:
    """ln p_η(z_k | x) = log softmax(s / temperature) over the top-K passages."""
    import torch

    return torch.log_softmax(scores / temperature, dim=-1)


def rag_sequence_logprob(doc_logprobs: Any, scores: Any, temperature: float = 1.0) -> Any:
    """RAG-sequence: ln p(y|x) = ln Σ_k p_η(z_k|x) Π_t p_θ(y_t | f(x, z_k), y_<t); returns [...]."""
    import torch

    log_weights = passage_log_weights(scores.to(doc_logprobs.dtype), temperature)
    return torch.logsumexp(log_weights + doc_logprobs.sum(-1), dim=-1)


def rag_sequence_token_logprobs(doc_logprobs: Any, scores: Any, temperature: float = 1.0) -> Any:
    """RAG-sequence per token: ln p(y_t | x, y_<t) = ln Σ_k w_k,t p_k(y_t), the passage weights
    being the posterior given the tokens so far, w_k,t ∝ p_η(z_k|x) Π_{s<t} p_k(y_s). The tokens'
    sum telescopes to `rag_sequence_logprob`; returns [..., T]."""
    import torch

    log_weights = passage_log_weights(scores.to(doc_logprobs.dtype), temperature)
    before = doc_logprobs.cumsum(-1) - doc_logprobs  # Σ_{s<t} ln p_k(y_s)
    posterior = log_weights[..., None] + before
    return torch.logsumexp(posterior + doc_logprobs, dim=-2) - torch.logsumexp(posterior, dim=-2)


def rag_token_logprob(doc_logprobs: Any, scores: Any, temperature: float = 1.0) -> Any:
    """RAG-token (REPLUG's mixture per token): ln p(y|x) = Σ_t ln Σ_k p_η(z_k|x) p_k(y_t); [...]."""
    return mixture_logprobs(doc_logprobs, scores, temperature).sum(-1)


def lsr_kl(scores: Any, lm_logprobs: Any, retrieval_temperature: float = 1.0,
           lm_temperature: float = 1.0) -> Any:
    """REPLUG-LSR: KL(Q ‖ P_R) = Σ_k Q_k (ln Q_k − ln P_R,k), with P_R = softmax(s / γ) the
    retriever's distribution over the top-K and Q = softmax(ln p_LM(y | z_k, x) / β) the frozen
    LM's, treated as a constant target (no gradient). Its gradient in s is (P_R − Q) / γ.
    `lm_logprobs` [..., K] are sequence log-likelihoods; returns [...]."""
    import torch

    target = torch.log_softmax(lm_logprobs.detach().to(scores.dtype) / lm_temperature, dim=-1)
    log_p_r = passage_log_weights(scores, retrieval_temperature)
    return (target.exp() * (target - log_p_r)).sum(-1)


class Objective(Plugin):
    """A training loss of `raghub train`: per example, from the top-K passages' retrieval
    scores [B, K] and the answer's token log-probs under each [B, K, T] (0 at padding), a loss
    [B] to minimise. `trains_generator` False freezes the generator (REPLUG-LSR)."""

    trains_generator: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        self.settings = self.resolve_options(options)

    def loss(self, scores: Any, doc_logprobs: Any) -> Any:
        raise NotImplementedError
