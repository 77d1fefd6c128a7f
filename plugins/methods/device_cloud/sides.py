"""One side's documents, each with its own KV cache, advanced token by token together."""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import torch

from raghub import LanguageModel, UsageError, mixture_logprobs

from .mixing import side_weight


class DocumentSide:
    """One side's documents, each with its own KV cache, advanced token by token together.

    `mixture()` is ℓ_side at the current position; the last `max_rollback` positions can be
    undone. A side without documents runs the closed-book prompt with weight -inf.
    """

    def __init__(self, model: LanguageModel, prompts: Sequence[Sequence[int]],
                 scores: Sequence[float], temperature: float, closed_book: Sequence[int],
                 max_rollback: int = 0):
        self.model = model
        if prompts:
            self.scores = torch.tensor(scores, dtype=torch.float32)
            self.weight = side_weight(self.scores, temperature)
        else:
            prompts, self.scores, self.weight = [closed_book], torch.zeros(1), -float("inf")
        if not all(prompts):
            raise UsageError("device-cloud needs a non-empty prompt to condition the first token")
        self.temperature = temperature
        self.caches: list[Any] = [None] * len(prompts)
        first = self._forward(list(prompts))
        self._mixtures = deque([first], maxlen=max_rollback + 1)

    @torch.inference_mode()
    def _forward(self, new_tokens: list[Sequence[int]]) -> torch.Tensor:
        doc_logprobs = []
        for doc, ids in enumerate(new_tokens):
            output = self.model.hf_model(
                input_ids=torch.tensor([list(ids)], device=self.model.device),
                cache=self.caches[doc], use_cache=True)
            self.caches[doc] = output.cache
            doc_logprobs.append(output.logits[0, -1].float().log_softmax(-1).cpu())
        return mixture_logprobs(torch.stack(doc_logprobs), self.scores, self.temperature)

    def mixture(self) -> torch.Tensor:
        return self._mixtures[-1]

    def advance(self, token: int) -> None:
        self._mixtures.append(self._forward([[token]] * len(self.caches)))

    def rollback(self, steps: int) -> None:
        """Forget the last `steps` advanced tokens (their KV entries and mixtures)."""
        if steps == 0:
            return
        if steps >= len(self._mixtures):
            raise ValueError(f"cannot roll back {steps} steps; only {len(self._mixtures) - 1} kept")
        for _ in range(steps):
            self._mixtures.pop()
        for cache in self.caches:
            cache.crop(-steps)  # transformers >= 5: a negative count removes that many tokens
