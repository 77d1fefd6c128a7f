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


#: answers HotpotQA's official evaluation scores only when the prediction is the same answer
YES_NO_ANSWERS = {"yes", "no", "noanswer"}


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 after normalisation. As in HotpotQA's official evaluation, when either
    side is yes / no / noanswer the two must be equal to score."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in YES_NO_ANSWERS or ref in YES_NO_ANSWERS) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def answer_match(prediction: str, gold: str) -> float:
    """Match (BERGEN's lenient metric): 1 when the normalised gold occurs in the normalised
    prediction as whole words ("Paris" in "it is Paris, France", not "Paris" in "Parisian").
    A yes / no / noanswer gold must be the prediction's first word, as HotpotQA scores such
    answers only when the prediction gives that answer: "no" in "yes, there is no doubt" does
    not count."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if not ref:
        return 0.0
    if ref in YES_NO_ANSWERS:
        return float(pred.split()[:1] == [ref])
    return float(f" {ref} " in f" {pred} ")


def best_over_aliases(metric, prediction: str, golds: Sequence[str]) -> float:
    """The best score of `prediction` against any gold alias (0 when there is none)."""
    return max((metric(prediction, gold) for gold in golds), default=0.0)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- standard errors
#
# Every ranked metric is a ratio of sums over the examples, R = Σy / Σx: a mean has x = 1
# (EM, F1, recall@k), bits per byte has y = NLL / ln 2 and x = bytes. Its standard error, by
# the delta method for a ratio of means, is
#
#     se(R) ≈ sqrt(Σ (y_i − R·x_i)² / (n(n−1))) / mean(x),
#
# which for x = 1 is the standard error of the mean, sample std (n−1) / sqrt(n).


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean: the sample standard deviation (n − 1) over sqrt(n); None
    for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    centre = sum(values) / n
    return math.sqrt(sum((v - centre) ** 2 for v in values) / (n - 1) / n)


def ratio_standard_error(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Delta-method standard error of R = Σy / Σx over n examples:
    sqrt(Σ (y_i − R·x_i)² / (n(n−1))) / mean(x); None for fewer than two examples."""
    ratio = sum(numerators) / sum(denominators)
    # the residuals y_i − R·x_i sum to zero, so their standard error of the mean is the root
    residual_se = standard_error([y - ratio * x for y, x in zip(numerators, denominators)])
    return None if residual_se is None else residual_se / mean(denominators)


def perplexity_standard_error(ppl: float, nats_standard_error: float | None) -> float | None:
    """se(exp(nats)) ≈ exp(nats) · se(nats), by the delta method."""
    return None if nats_standard_error is None else ppl * nats_standard_error


def ratio_estimates(terms: Sequence[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float | None]]:
    """(Σy / Σx, its standard error) of each metric, from each example's {metric: (y, x)}; a
    metric counts only the examples that have it."""
    names = dict.fromkeys(name for example in terms for name in example)
    estimates = {}
    for name in names:
        pairs = [example[name] for example in terms if name in example]
        numerators, denominators = [y for y, _ in pairs], [x for _, x in pairs]
        estimates[name] = (sum(numerators) / sum(denominators),
                           ratio_standard_error(numerators, denominators))
    return estimates


def paired_difference(numerators_a: Sequence[float], numerators_b: Sequence[float],
                      denominators: Sequence[float]) -> tuple[float, float | None]:
    """R_A − R_B of two runs on the same examples (the same x_i), and its paired standard error:
    the ratio estimate and delta-method se of d_i = y_A,i − y_B,i over x_i."""
    differences = [a - b for a, b in zip(numerators_a, numerators_b)]
    return sum(differences) / sum(denominators), ratio_standard_error(differences, denominators)
