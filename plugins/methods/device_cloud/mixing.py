"""The formulas of DRAGON's device-cloud mixing: each side's weight, the aggregate of the two
sides, speculative sampling's accept rule, and how one ranked list is dealt to the sides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from raghub import Retrieved, mixture_logprobs

if TYPE_CHECKING:  # pragma: no cover
    import torch


def side_weight(scores: torch.Tensor, temperature: float = 1.0) -> float:
    """W_side = logsumexp(s / T): a side's share of the union's softmax, before normalising."""
    import torch

    return float(torch.logsumexp(scores.double() / temperature, dim=-1))


def combine_sides(side_logprobs: torch.Tensor, side_weights: torch.Tensor) -> torch.Tensor:
    """The aggregate log p = logsumexp_side(log softmax(W)_side + ℓ_side): the REPLUG mixture
    with the sides as documents and their weights as scores. All sides closed-book (weights all
    -inf) count equally."""
    import torch

    if torch.isneginf(side_weights).all():
        side_weights = torch.zeros_like(side_weights)
    return mixture_logprobs(side_logprobs, side_weights)


def resolve_draft(draft: int, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                  generator: torch.Generator) -> tuple[int, bool]:
    """Speculative sampling (Leviathan et al., Chen et al.): keep `draft` with probability
    min(1, target(draft) / draft_probs(draft)); otherwise sample from the residual
    max(0, target - draft_probs), renormalised. Returns (token, accepted)."""
    import torch

    ratio = target_probs[draft] / draft_probs[draft]
    if ratio >= 1 or torch.rand((), generator=generator) < ratio:
        return draft, True
    residual = (target_probs - draft_probs).clamp(min=0)
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator)), False


def deal_alternately(hits: Sequence[Retrieved]) -> tuple[list[Retrieved], list[Retrieved]]:
    """DRAGON's split of one ranked list: ranks 1, 3, ... to the device, 2, 4, ... to the cloud."""
    return list(hits[0::2]), list(hits[1::2])
