"""`rag-sequence`: RAG-sequence (Lewis et al., 2020): the target marginalised over the K
passages at the sequence level, p(y|x) = Σ_k p_η(z_k|x) Π_t p_θ(y_t | f(x, z_k), y_<t), with
p_η = softmax(retrieval score / temperature).

- Language modelling: every (window, passage) pair scored in one batched call, then per token
  a mixture whose passage weights are the posterior given the window's tokens so far; the
  window's summed ln p is then exactly ln Σ_k w_k Π_t p_k(y_t). (`ensemble`, RAG-token, mixes
  every token with the prior weights instead.)
- QA: RAG's "thorough" decoding: one greedy candidate per passage, each candidate scored under
  every passage (`continuation_logprobs`), the candidate of highest p(y|x) wins.

`--checkpoint DIR` (a `raghub train` output) evaluates the trained generator (LoRA adapter or
fine-tuned weights), which the runner loads into the model; the `dense` and `dpr` retrievers
read the same flag for their encoders.
"""

from __future__ import annotations

from raghub import (CHECKPOINT_OPTION, Method, Option, answer_continuation, answer_questions, generate_for, hookimpl,
                    normalize_answer, passage_logprobs, rag_sequence_logprob, rag_sequence_token_logprobs)


def candidates(answers: list[str]) -> list[str]:
    """The non-empty answers, each once after SQuAD normalisation (first spelling kept)."""
    kept: dict[str, str] = {}
    for answer in answers:
        if normalize_answer(answer):
            kept.setdefault(normalize_answer(answer), answer)
    return list(kept.values())


class RagSequence(Method):
    name = "rag-sequence"
    description = "RAG-sequence: the target marginalised over the passages at the sequence level"
    needs_retrieval = True
    families = frozenset({"language-modelling", "qa"})
    requires = frozenset({"continuation_logprobs"})  # scoring candidate answers
    options = {
        "temperature": Option(float, 1.0, "passage weights are softmax(score / temperature)", above=0),
        "checkpoint": CHECKPOINT_OPTION,
    }

    def score_windows(self, windows, retrieved):
        """Per token, the passages mixed with their posterior weights given the tokens so far."""
        return [rag_sequence_token_logprobs(doc_logprobs, scores, self.settings["temperature"])
                for doc_logprobs, scores in passage_logprobs(self.model, windows, retrieved)]

    def answer(self, questions, retrieved):
        """Thorough decoding: K greedy candidates per question (one batched call), then every
        (candidate, passage) pair scored in one batched call; the best p(y|x) wins. A question
        without passages is answered closed book."""
        import torch

        with_docs = [(q, docs) for q, docs in zip(questions, retrieved) if docs]
        pairs = [(q, r.passage) for q, docs in with_docs for r in docs]
        generations = iter(generate_for(self.model, [q for q, _ in pairs], [[p] for _, p in pairs]) if pairs else [])
        options = [candidates([q.extract(next(generations).text) for _ in docs]) for q, docs in with_docs]
        prompts = [[q.prompt([r.passage]) for r in docs] for q, docs in with_docs]
        requests = [(prompt, answer_continuation(prompt, c)) for own, texts in zip(options, prompts)
                    for c in own for prompt in texts]
        scored = iter(self.model.continuation_logprobs(*zip(*requests)) if requests else [])
        best = {}
        for (question, docs), own in zip(with_docs, options):
            if not own:
                best[question.id] = ""
                continue
            sums = torch.tensor([[next(scored).sum().item() for _ in docs] for _ in own])
            marginal = rag_sequence_logprob(sums[..., None], torch.tensor([r.score for r in docs]),
                                            self.settings["temperature"])
            best[question.id] = own[int(marginal.argmax())]
        closed = [q for q, docs in zip(questions, retrieved) if not docs]
        best.update(zip([q.id for q in closed], answer_questions(self.model, closed, [[] for _ in closed])
                        if closed else []))
        return [best[q.id] for q in questions]


@hookimpl
def register_methods(register):
    register(RagSequence)
