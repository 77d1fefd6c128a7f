"""Standard errors and paired differences, each against a hand-computed 3-example case."""

import math

import pytest

from raghub.metrics import (paired_difference, perplexity_standard_error, ratio_estimates,
                            ratio_standard_error, standard_error)
from raghub.plugins.tasks.language_modelling import LanguageModelling
from raghub.plugins.tasks.question_answering.task import QATask, aggregate_stats


def test_standard_error_of_the_mean_by_hand():
    # mean 1/3; squared deviations 4/9 + 1/9 + 1/9 = 2/3; / (n − 1) = 1/3; / n = 1/9
    assert standard_error([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert standard_error([0.5]) is None and standard_error([]) is None


def test_ratio_standard_error_by_hand():
    # R = 6 / 4 = 1.5; residuals y − R·x = 1.5, −2, 0.5; their squares sum to 6.5;
    # sqrt(6.5 / (3·2)) / mean(x) = sqrt(13/12) / (4/3)
    assert ratio_standard_error([3.0, 1.0, 2.0], [1.0, 2.0, 1.0]) == pytest.approx(math.sqrt(13 / 12) * 3 / 4)
    assert ratio_standard_error([3.0], [2.0]) is None


def test_a_ratio_over_ones_is_the_mean_and_its_standard_error():
    values = [0.2, 0.9, 0.4]
    assert ratio_standard_error(values, [1.0] * 3) == pytest.approx(standard_error(values))


def test_perplexity_standard_error_by_the_delta_method():
    assert perplexity_standard_error(4.0, 0.1) == pytest.approx(0.4)
    assert perplexity_standard_error(4.0, None) is None


def test_paired_difference_by_hand():
    # d = (3 − 1, 1 − 1, 2 − 0) = (2, 0, 2) over x = (1, 2, 1): R = 4/4 = 1; residuals 1, −2, 1
    # square to 6; sqrt(6 / 6) / mean(x) = 3/4
    difference, se = paired_difference([3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [1.0, 2.0, 1.0])
    assert (difference, se) == pytest.approx((1.0, 0.75))
    # means (x = 1): EM 1, 0, 1 against 0, 0, 1 differ by d = 1, 0, 0: mean 1/3, se 1/3
    assert paired_difference([1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0] * 3) == pytest.approx((1 / 3, 1 / 3))


def test_ratio_estimates_count_only_the_examples_that_have_a_metric():
    terms = [{"em": (1.0, 1.0), "recall@2": (0.5, 1.0)}, {"em": (0.0, 1.0)}, {"em": (0.0, 1.0)}]
    assert ratio_estimates(terms) == {"em": pytest.approx((1 / 3, 1 / 3)), "recall@2": (0.5, None)}


WINDOWS = [{"nll": 3.0, "tokens": 1, "bytes": 2}, {"nll": 1.0, "tokens": 2, "bytes": 4},
           {"nll": 2.0, "tokens": 1, "bytes": 2}]


def test_language_modelling_standard_errors_and_totals_by_hand():
    task = LanguageModelling("toy", {}, None)
    se_nats = math.sqrt(13 / 12) * 3 / 4           # the ratio case above: nll over tokens
    # bits per byte: residuals (nll_i − 0.75·bytes_i) / ln 2 = (1.5, −2, 0.5) / ln 2, mean bytes 8/3
    se_bits = math.sqrt(13 / 12) / math.log(2) * 3 / 8
    assert task.standard_errors(WINDOWS) == pytest.approx(
        {"nats_per_token": se_nats, "bits_per_byte": se_bits, "ppl": math.exp(1.5) * se_nats})
    assert task.totals(WINDOWS) == {"nll": 6.0, "tokens": 4, "bytes": 8}


def ratios(task_class, stats):
    return {name: value for name, (value, _) in ratio_estimates([task_class.metric_terms(s) for s in stats]).items()}


def test_metric_terms_give_the_tasks_own_metrics():
    """The ratios of the terms that the errors and `raghub compare` use are the metrics."""
    lm_metrics = LanguageModelling("toy", {}, None).aggregate(WINDOWS)
    assert ratios(LanguageModelling, WINDOWS) == pytest.approx(
        {key: lm_metrics[key] for key in ("nats_per_token", "bits_per_byte")})
    questions = [{"type": "", "em": 1.0, "f1": 1.0, "match": 1.0, "recall@2": 0.5, "prediction": "x"},
                 {"type": "", "em": 0.0, "f1": 0.5, "match": 1.0}]
    qa_metrics = aggregate_stats(questions)
    assert ratios(QATask, questions) == pytest.approx(
        {key: qa_metrics[key] for key in ("em", "f1", "match", "recall@2")})
