"""The language-modelling contract: a task hands methods `Window`s; a method returns ln p of
each window's target tokens (`Method.score_windows`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from raghub.interfaces import Example, Passage

if TYPE_CHECKING:  # pragma: no cover
    from raghub.models import LanguageModel


@dataclass(kw_only=True)
class Window(Example):
    """One scored span of the text. A method returns ln p(target_i | [retrieved passage
    tokens] + context_ids + target_ids[:i]), each passage cut to `retrieved_max_length` tokens."""

    context_ids: list[int]
    target_ids: list[int]
    retrieved_max_length: int
    n_bytes: int = 0  #: UTF-8 bytes of the scored span


def passage_ids(model: LanguageModel, passage: Passage, max_length: int) -> list[int]:
    """A retrieved passage as tokens: its text cut to `max_length - 1` tokens, then a newline."""
    return model.encode(passage.as_text())[: max_length - 1] + model.encode("\n")


def score_after_prefixes(model: LanguageModel, windows: Sequence[Window],
                         prefixes: Sequence[list[int]]) -> list[Any]:
    """ln p of each window's targets given its prefix tokens and context, in one batched call."""
    sequences = [prefix + w.context_ids + w.target_ids for w, prefix in zip(windows, prefixes)]
    starts = [len(prefix) + len(w.context_ids) for w, prefix in zip(windows, prefixes)]
    return model.sequence_logprobs(sequences, starts)
