"""The built-in training objectives: `rag-sequence` (ContextFlow's joint loss), `rag-token` and
REPLUG-LSR's `lsr` (generator frozen). Each is one of the core's formulas, negated where it is a
log-likelihood."""

from __future__ import annotations

from raghub import Objective, Option, lsr_kl, rag_sequence_logprob, rag_token_logprob

TEMPERATURE = Option(float, 0.1, "p_η(z|x) = softmax(score / temperature) over the top-K (γ in "
                                 "REPLUG-LSR); 0.1 suits cosine scores", above=0)


class RagSequenceObjective(Objective):
    name = "rag-sequence"
    description = "−ln Σ_k p_η(z_k|x) Π_t p_θ(y_t|f(x,z_k)): retriever and generator trained jointly"
    options = {"temperature": TEMPERATURE}

    def loss(self, scores, doc_logprobs):
        return -rag_sequence_logprob(doc_logprobs, scores, self.settings["temperature"])


class RagTokenObjective(Objective):
    name = "rag-token"
    description = "−Σ_t ln Σ_k p_η(z_k|x) p_θ(y_t|f(x,z_k),y_<t): the passages mixed per token"
    options = {"temperature": TEMPERATURE}

    def loss(self, scores, doc_logprobs):
        return -rag_token_logprob(doc_logprobs, scores, self.settings["temperature"])


class LsrObjective(Objective):
    name = "lsr"
    description = "REPLUG-LSR: KL(Q ‖ P_R), Q from the frozen LM's answer likelihoods; only the retriever trains"
    trains_generator = False
    options = {"temperature": TEMPERATURE,
               "lm_temperature": Option(float, 0.1, "Q = softmax(ln p_LM(y|z,x) / lm_temperature) (β)", above=0)}

    def loss(self, scores, doc_logprobs):
        return lsr_kl(scores, doc_logprobs.sum(-1), self.settings["temperature"], self.settings["lm_temperature"])


OBJECTIVES = (RagSequenceObjective, RagTokenObjective, LsrObjective)
