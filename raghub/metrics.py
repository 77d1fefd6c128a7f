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


# --------------------------------------------------------------------------- judged metrics


def yes_probability(logprob_yes: float, logprob_no: float, temperature: float = 1.0) -> float:
    """A judge's p(yes) from its log-probs of answering "Yes" and "No", renormalised over the
    two and sharpened (temperature < 1) or flattened (> 1): 1 / (1 + exp((ln p_no − ln p_yes) / T));
    NaN when the log-odds are undefined (a NaN log-prob, or neither answer possible)."""
    log_odds = (logprob_no - logprob_yes) / temperature
    if math.isnan(log_odds):
        return math.nan
    return 1.0 / (1.0 + math.exp(max(-700.0, min(700.0, log_odds))))


def repeated_judgement(verdicts: Sequence[Sequence[float]]) -> tuple[float, float | None, float | None]:
    """The judged accuracy over n questions judged R times each (verdicts[i][r] in {0, 1}), its
    standard error including the judge's own variance, and that within-question variance.

    With m_i the mean of question i's R verdicts, the accuracy is A = mean_i m_i and

        se(A)² = σ̂²_between / n + σ̂²_within / (n R)
        σ̂²_within  = mean_i s_i²              (s_i²: the sample variance of question i's R verdicts)
        σ̂²_between = s²(m) − σ̂²_within / R   (s²(m): the sample variance of the m_i, n − 1)

    the two-stage (questions, then the judge's repeats) variance: the between-question part is
    what a perfectly consistent judge would leave, the within-question part is the judge's
    noise. The sum equals s²(m) / n. None for what fewer than two questions (or repeats) leave
    undefined."""
    n, repeats = len(verdicts), len(verdicts[0])
    means = [sum(v) / repeats for v in verdicts]
    accuracy = sum(means) / n
    within = mean(standard_error(v) ** 2 * repeats for v in verdicts) if repeats > 1 else None
    se_of_means = standard_error(means)
    if se_of_means is None:
        return accuracy, None, within
    between = se_of_means ** 2 * n - (within or 0.0) / repeats
    return accuracy, math.sqrt(between / n + (within or 0.0) / (n * repeats)), within


def self_agreement(verdicts: Sequence[Sequence[float]]) -> float | None:
    """The share of pairs of one question's repeated verdicts that agree, averaged over the
    questions (None with one repeat)."""
    repeats = len(verdicts[0])
    if repeats < 2:
        return None
    pairs = repeats * (repeats - 1) / 2
    return mean(sum(a == b for i, a in enumerate(v) for b in v[i + 1:]) / pairs for v in verdicts)


def confusion_counts(a: Sequence[float], b: Sequence[float]) -> dict[str, int]:
    """How often two 0/1 labelings of the same items agree and differ: both_1, only_a, only_b, both_0."""
    pairs = list(zip(a, b))
    return {"both_1": pairs.count((1, 1)), "only_a": pairs.count((1, 0)),
            "only_b": pairs.count((0, 1)), "both_0": pairs.count((0, 0))}


def cohen_kappa(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cohen's kappa of two 0/1 labelings: (p_o − p_e) / (1 − p_e), p_o the share of agreement
    and p_e the agreement expected by chance from each labeling's share of 1s; None when chance
    alone agrees on everything (p_e = 1)."""
    n = len(a)
    counts = confusion_counts(a, b)
    observed = (counts["both_1"] + counts["both_0"]) / n
    share_a, share_b = sum(a) / n, sum(b) / n
    expected = share_a * share_b + (1 - share_a) * (1 - share_b)
    return None if expected == 1 else (observed - expected) / (1 - expected)
