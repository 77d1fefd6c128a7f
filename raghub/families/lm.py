"""The language-modelling contract: a task hands methods `Window`s; a method returns ln p of
each window's target tokens (`Method.score_windows`). A task asks through `logprobs_from`,
which checks that contract.

What a method puts before a window must fit the model with it: `passages_prefix` leaves out the
lowest-ranked passages until it does (counted in the run's method_stats and said once on
stderr), and `score_after_prefixes` refuses a sequence longer than the model takes."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, takewhile
from typing import TYPE_CHECKING, Any, Sequence

from raghub.errors import ReturnedWrong, RunError, amount
from raghub.interfaces import Example, Method, Passage, Retrieved

if TYPE_CHECKING:  # pragma: no cover
    from raghub.models import LanguageModel


@dataclass(kw_only=True)
class Window(Example):
    """One scored span of the text. A method returns ln p(target_i | [retrieved passage
    tokens] + context_ids + target_ids[:i]), each passage cut to `retrieved_max_length` tokens
    and as many passages as fit the model (`passages_prefix`)."""

    context_ids: list[int]
    target_ids: list[int]
    retrieved_max_length: int
    n_bytes: int = 0  #: UTF-8 bytes of the scored span
    text_start: str = ""  #: the scored span's first words, for the samples log


def logprobs_from(method: Method, windows: Sequence[Window],
                  retrieved: Sequence[Sequence[Retrieved]]) -> list[Any]:
    """`method.score_windows` for the windows: per window a 1-D tensor of ln p, one per target
    token, else a RunError naming the method's plugin and what it returned."""
    import torch

    logprobs = method.score_windows(windows, retrieved)
    if not isinstance(logprobs, (list, tuple)):
        raise ReturnedWrong("method", method, f"{logprobs!r}; it must return one tensor per window")
    if len(logprobs) != len(windows):
        raise ReturnedWrong("method", method, f"{amount(len(logprobs), 'log-prob tensor')} for "
                                              f"{amount(len(windows), 'window')}")
    for window, scores in zip(windows, logprobs):
        if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
            raise ReturnedWrong("method", method, f"{scores!r} for window {window.id}; it must return a 1-D "
                                                  "tensor of ln p per target token")
        if len(scores) != len(window.target_ids):
            raise ReturnedWrong("method", method, f"{amount(len(scores), 'log-prob')} for window {window.id}, "
                                                  f"which has {amount(len(window.target_ids), 'target token')}")
    return list(logprobs)


def passage_ids(model: LanguageModel, passage: Passage, max_length: int) -> list[int]:
    """A retrieved passage as tokens: its text cut to `max_length - 1` tokens, then a newline."""
    return model.encode(passage.as_text())[: max_length - 1] + model.encode("\n")


def room_before(model: LanguageModel, window: Window) -> int | None:
    """How many tokens may go before the window's context within the model's length (None: no
    limit); a RunError when the window alone is longer."""
    limit = model.max_input_tokens()
    if limit is None:
        return None
    length = len(window.context_ids) + len(window.target_ids)
    if length > limit:
        raise RunError(f"window {window.id}: its {length} tokens of context and targets are more than the "
                       f"{limit} {model.name} takes; give a smaller --context-len and --pred-len (or --stride)")
    return limit - length


def passages_prefix(model: LanguageModel, window: Window, retrieved: Sequence[Retrieved]) -> list[int]:
    """The tokens to put before the window's context: its passages best first (`passage_ids`),
    the lowest-ranked left out while they would not fit the model with the window (counted by
    `LanguageModel.drop_passages`)."""
    pieces = [passage_ids(model, r.passage, window.retrieved_max_length) for r in retrieved]
    room = room_before(model, window)
    if room is not None:
        kept = len(list(takewhile(lambda total: total <= room, accumulate(map(len, pieces)))))
        model.drop_passages(len(pieces) - kept, f"window {window.id}: its {len(pieces)} passages and its "
                                                f"tokens are more than the {model.max_input_tokens()} "
                                                f"{model.name} takes")
        pieces = pieces[:kept]
    return [token for piece in pieces for token in piece]


def score_after_prefixes(model: LanguageModel, windows: Sequence[Window],
                         prefixes: Sequence[list[int]]) -> list[Any]:
    """ln p of each window's targets given its prefix tokens and context, in one batched call; a
    RunError when a prefix and its window are longer than the model takes."""
    for window, prefix in zip(windows, prefixes):
        room = room_before(model, window)
        if room is not None and len(prefix) > room:
            raise RunError(f"window {window.id}: the {len(prefix)} tokens put before it leave it no room "
                           f"within the {model.max_input_tokens()} tokens {model.name} takes")
    sequences = [prefix + w.context_ids + w.target_ids for w, prefix in zip(windows, prefixes)]
    starts = [len(prefix) + len(w.context_ids) for w, prefix in zip(windows, prefixes)]
    return model.sequence_logprobs(sequences, starts)


def passage_logprobs(model: LanguageModel, windows: Sequence[Window],
                     retrieved: Sequence[Sequence[Retrieved]]) -> list[tuple[Any, Any]]:
    """Per window, (ln p of its targets after each retrieved passage [K, T], the passages' raw
    scores [K]), every (window, passage) pair in one batched call. A window without passages
    (the first) is scored on its context alone, as one passage of score 0."""
    import torch

    pairs = [(w, r) for w, docs in zip(windows, retrieved) for r in docs or [None]]
    prefixes = [passages_prefix(model, w, [r] if r else []) for w, r in pairs]
    per_passage = iter(score_after_prefixes(model, [w for w, _ in pairs], prefixes))
    return [(torch.stack([next(per_passage) for _ in docs or [None]]),
             torch.tensor([r.score for r in docs] or [0.0])) for docs in retrieved]
