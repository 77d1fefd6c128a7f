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


def test_effective_passages_count_how_many_passages_the_weights_really_mix():
    from raghub.plugins.methods.ensemble import effective_passages, passage_weights

    assert effective_passages(passage_weights([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_passages([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    # weights 1/4 and 3/4: exp(-(1/4 ln 1/4 + 3/4 ln 3/4)) = 1.7548
    assert effective_passages(passage_weights([0.0, math.log(3.0)])) == pytest.approx(1.7548, abs=1e-4)


def test_the_ensemble_reports_the_mean_over_examples_that_retrieved():
    from raghub import Passage, Retrieved
    from raghub.plugins.methods.ensemble import Ensemble

    method = Ensemble(None, None, temperature=1.0)
    method._mixing_scores([Retrieved(Passage("a", "x"), 1.0), Retrieved(Passage("b", "y"), 1.0)])
    method._mixing_scores([Retrieved(Passage("c", "z"), 5.0)])
    method._mixing_scores([])  # a window without passages (the first) is not counted
    assert method.run_stats() == {"mean_effective_passages": pytest.approx(1.5)}


def test_the_qa_vote_weighs_each_answer_by_the_confidence_of_its_own_line():
    """An answer's confidence is that of the line it is read from: passage A's "Ulm" (ln p -0.1
    per token) beats passage B's "Bea Mann" (-0.4) at equal weights, whatever A's generation
    would go on to write after its line (a new question, of ln p -5 per token)."""
    from raghub import Passage, Question, Retrieved
    from raghub.plugins.methods.ensemble import Ensemble
    from scripted import ScriptedModel, titles

    replies = {"A": [(" Ulm", -0.1), ("\n", -0.1), ("Question:", -5.0), (" Who", -5.0), (" else?", -5.0)],
               "B": [(" Bea", -0.4), (" Mann", -0.4), ("\n", -0.4)]}
    model = ScriptedModel(lambda prompt: replies[titles(prompt)[0]])
    question = Question(id="q1", query="born?", question="Where was the director born?")
    docs = [Retrieved(Passage("a", "x", title="A"), 1.0), Retrieved(Passage("b", "y", title="B"), 1.0)]
    assert Ensemble(model, None).answer([question], [docs]) == ["Ulm"]


def test_a_question_without_passages_is_answered_closed_book_by_the_qa_ensemble():
    """As a window without passages is scored on its context alone, and as rag-sequence does."""
    from raghub import Passage, Question, Retrieved
    from raghub.plugins.methods.ensemble import Ensemble
    from scripted import ScriptedModel, titles

    model = ScriptedModel(lambda prompt: " Ulm\n" if titles(prompt) else " Paris\n")
    with_docs, without = (Question(id=n, query="born?", question=f"Where was {n} born?") for n in ("q1", "q2"))
    docs = [Retrieved(Passage("a", "x", title="A"), 1.0)]
    assert Ensemble(model, None).answer([with_docs, without], [docs, []]) == ["Ulm", "Paris"]
    assert Ensemble(model, None).answer([without], [[]]) == ["Paris"]
