"""Metric formulas as pure functions, each unit-tested against hand-computed values."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence


def nats_per_token(total_nll: float, n_tokens: int) -> float:
    """Mean negative natural-log likelihood per scored token."""
    return total_nll / n_tokens


def perplexity(total_nll: float, n_tokens: int) -> float:
    return math.exp(nats_per_token(total_nll, n_tokens))


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Σ(−ln p) / (ln 2 · UTF-8 bytes of the scored text): tokenizer-independent."""
    return total_nll / (math.log(2) * n_bytes)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 after normalisation. As in HotpotQA's official evaluation, when either
    side is yes / no / noanswer the two must be equal to score."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = {"yes", "no", "noanswer"}
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_aliases(metric, prediction: str, golds: Sequence[str]) -> float:
    """The best score of `prediction` against any gold alias (0 when there is none)."""
    return max((metric(prediction, gold) for gold in golds), default=0.0)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
