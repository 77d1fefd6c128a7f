"""REPLUG's output mixture, checked against hand-computed values."""

import math

import pytest
import torch

from raghub import mixture_logprobs


def test_single_document_gives_its_own_log_probs():
    doc = torch.tensor([[-0.5, -2.0, -3.25]])
    assert torch.allclose(mixture_logprobs(doc, torch.tensor([7.0])), doc[0])


def test_equal_scores_give_log_of_mean_probability():
    doc = torch.log(torch.tensor([[0.2, 0.9], [0.6, 0.1]]))
    mixed = mixture_logprobs(doc, torch.tensor([3.0, 3.0]))
    assert torch.allclose(mixed, torch.log(torch.tensor([0.4, 0.5])))


def test_two_documents_hand_computed():
    # scores 0 and ln 3 -> weights 1/4 and 3/4; p = 1/4 * 0.2 + 3/4 * 0.6 = 0.5
    doc = torch.log(torch.tensor([[0.2], [0.6]]))
    mixed = mixture_logprobs(doc, torch.tensor([0.0, math.log(3.0)]))
    assert mixed.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_temperature_divides_scores():
    # scores 0 and 2 ln 3 at T=2 -> weights 1/4 and 3/4 as above
    doc = torch.log(torch.tensor([[0.2], [0.6]]))
    mixed = mixture_logprobs(doc, torch.tensor([0.0, 2 * math.log(3.0)]), temperature=2.0)
    assert mixed.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_batched_leading_dimensions_mix_each_row_independently():
    docs = torch.log(torch.tensor([[[0.2], [0.6]], [[0.5], [0.5]]]))
    scores = torch.tensor([[0.0, math.log(3.0)], [1.0, 5.0]])
    mixed = mixture_logprobs(docs, scores)
    assert torch.allclose(mixed, torch.log(torch.tensor([[0.5], [0.5]])), atol=1e-6)
