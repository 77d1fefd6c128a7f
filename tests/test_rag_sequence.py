"""RAG-sequence, RAG-token and REPLUG-LSR's formulas against hand-computed values on one
example: two passages with weights softmax(0, ln 3) = (1/4, 3/4) and a three-token target with
p_1 = (0.5, 0.4, 0.2) under passage 1 and p_2 = (0.2, 0.5, 0.6) under passage 2; then the
`rag-sequence` method on a model that returns exactly these numbers."""

import math

import pytest
import torch

from plugin_packages import _Tokenizer
from raghub import (Generation, LanguageModel, Passage, Question, Retrieved, Window, lsr_kl, rag_sequence_logprob,
                    rag_sequence_token_logprobs, rag_token_logprob)
from raghub.plugins.methods.ensemble import Ensemble
from raghub.plugins.methods.rag_sequence import RagSequence, candidates

SCORES = torch.tensor([0.0, math.log(3.0)])
P = torch.tensor([[0.5, 0.4, 0.2], [0.2, 0.5, 0.6]])
# p(y) = 1/4 · 0.04 + 3/4 · 0.06 = 0.055
SEQUENCE = 0.055
# per token with the posterior weights: 0.275, then (0.125·0.4 + 0.15·0.5) / 0.275, then
# (0.05·0.2 + 0.075·0.6) / 0.125
SEQUENCE_TOKENS = [0.275, 0.125 / 0.275, 0.44]
# RAG-token: (1/4 · 0.5 + 3/4 · 0.2) (1/4 · 0.4 + 3/4 · 0.5) (1/4 · 0.2 + 3/4 · 0.6)
TOKEN_TOKENS = [0.275, 0.475, 0.5]


def test_rag_sequence_marginal_hand_computed():
    assert rag_sequence_logprob(P.log(), SCORES).item() == pytest.approx(math.log(SEQUENCE), abs=1e-6)


def test_rag_sequence_per_token_posterior_mixture_hand_computed():
    tokens = rag_sequence_token_logprobs(P.log(), SCORES)
    assert tokens.exp().tolist() == pytest.approx(SEQUENCE_TOKENS, abs=1e-6)
    assert tokens.sum().item() == pytest.approx(math.log(SEQUENCE), abs=1e-6)


def test_rag_token_hand_computed():
    assert rag_token_logprob(P.log(), SCORES).item() == pytest.approx(math.log(0.275 * 0.475 * 0.5), abs=1e-6)


def test_padding_zeros_change_nothing():
    padded = torch.cat([P.log(), torch.zeros(2, 2)], dim=1)
    for formula in (rag_sequence_logprob, rag_token_logprob):
        assert formula(padded, SCORES).item() == pytest.approx(formula(P.log(), SCORES).item(), abs=1e-6)


def test_temperature_and_batch_dimensions():
    # scores (0, 2 ln 3) at temperature 2 give the same weights (1/4, 3/4)
    batched = rag_sequence_logprob(torch.stack([P.log(), P.log().flip(0)]),
                                   torch.stack([2 * SCORES, 2 * SCORES]), temperature=2.0)
    # the second row swaps the passages: 1/4 · 0.06 + 3/4 · 0.04 = 0.045
    assert batched.exp().tolist() == pytest.approx([SEQUENCE, 0.045], abs=1e-6)


def test_lsr_kl_direction_and_gradient_hand_computed():
    """Q = softmax(ln(0.04, 0.06)) = (0.4, 0.6), P_R = (1/4, 3/4):
    KL(Q ‖ P_R) = 0.4 ln(0.4 / 0.25) + 0.6 ln(0.6 / 0.75); d/ds = P_R − Q = (−0.15, 0.15)."""
    scores = SCORES.clone().requires_grad_(True)
    lm = P.log().sum(-1).requires_grad_(True)
    loss = lsr_kl(scores, lm)
    assert loss.item() == pytest.approx(0.4 * math.log(0.4 / 0.25) + 0.6 * math.log(0.6 / 0.75), abs=1e-6)
    loss.backward()
    assert scores.grad.tolist() == pytest.approx([-0.15, 0.15], abs=1e-6)
    assert lm.grad is None or not lm.grad.any()  # the LM's distribution is the fixed target
    # γ and β: scores (0, 0.1 ln 3) at γ = 0.1 and LM log-likelihoods × 0.5 at β = 0.5 give the same
    assert lsr_kl(SCORES * 0.1, P.log().sum(-1) * 0.5, 0.1, 0.5).item() == pytest.approx(loss.item(), abs=1e-6)


# --- the method -----------------------------------------------------------------------------

class TablesModel(LanguageModel):
    """A model whose log-probs are tables: a window's target token t after passage "A" or "B"
    has p_1[t] or p_2[t]; an answer given a passage, the value in `answers`."""

    device, dtype = "cpu", "float32"

    def __init__(self, answers=None, generated=None):
        super().__init__(_Tokenizer(), "tables")
        self.answers = answers or {}
        self.generated = generated or {}
        self.requests = []

    def encode(self, text):
        return [ord(c) for c in text]

    def sequence_logprobs(self, sequences, starts):
        return [P[0 if chr(seq[0]) == "A" else 1][: len(seq) - start].log() for seq, start in zip(sequences, starts)]

    def generate(self, prompts, max_new_tokens):
        return [Generation(self.generated[passage_in(prompt)], [-0.1]) for prompt in prompts]

    def continuation_logprobs(self, prompts, continuations):
        self.requests += [(passage_in(p), c) for p, c in zip(prompts, continuations)]
        return [torch.tensor([math.log(self.answers[(passage_in(p), c)])]) for p, c in zip(prompts, continuations)]


def passage_in(prompt):
    """The passage's text ("A" or "B") in a QA prompt, "" when it has none."""
    return prompt.split("Passage 1: ")[1][0] if "Passage 1: " in prompt else ""


def passages():
    return [Retrieved(Passage("a", "A"), 0.0), Retrieved(Passage("b", "B"), math.log(3.0))]


def test_on_language_modelling_rag_sequence_and_ensemble_differ_as_the_formulas_say():
    window = Window(id="w", query="q", context_ids=[120], target_ids=[1, 2, 3], retrieved_max_length=8)
    model = TablesModel()
    sequence = RagSequence(model, cache=None).score_windows([window], [passages()])[0]
    token = Ensemble(model, cache=None).score_windows([window], [passages()])[0]
    assert sequence.exp().tolist() == pytest.approx(SEQUENCE_TOKENS, abs=1e-6)
    assert token.exp().tolist() == pytest.approx(TOKEN_TOKENS, abs=1e-6)
    assert sequence[0].item() == pytest.approx(token[0].item())  # the first token: same prior weights


def test_thorough_decoding_picks_the_best_marginal_not_the_best_passage():
    """Passage B (weight 3/4) generates "Lyon", passage A "Paris"; p(Paris) = 1/4 · 0.9 + 3/4 ·
    0.5 = 0.6 beats p(Lyon) = 1/4 · 0.01 + 3/4 · 0.4 = 0.3025."""
    answers = {("A", " Paris\n"): 0.9, ("B", " Paris\n"): 0.5, ("A", " Lyon\n"): 0.01, ("B", " Lyon\n"): 0.4}
    model = TablesModel(answers, generated={"A": " Paris\nmore", "B": "Lyon", "": "Orléans"})
    question = Question(id="q1", query="capital?", question="Capital of France?")
    closed = Question(id="q2", query="", question="Nothing retrieved?")
    answered = RagSequence(model, cache=None).answer([question, closed], [passages(), []])
    assert answered == ["Paris", "Orléans"]
    assert sorted(model.requests) == sorted(answers)  # every candidate under every passage
    answers[("B", " Paris\n")] = 0.1  # now p(Paris) = 0.225 + 0.075 = 0.3 < p(Lyon) = 0.3025
    assert RagSequence(model, cache=None).answer([question], [passages()]) == ["Lyon"]


def test_candidates_are_unique_after_normalisation_and_never_empty():
    assert candidates(["The Paris", "paris", "", "Lyon", " "]) == ["The Paris", "Lyon"]
