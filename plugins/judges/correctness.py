"""The `correctness` judge: asks the judge model whether a prediction answers the question, given
the gold answers (BERGEN's LLMeval form, in prompts of our own), and reads its yes / no from its
log-probs of answering "Yes" and "No", so that even a small judge gives a graded p(yes)."""

from __future__ import annotations

from raghub import Judge, hookimpl, yes_probability

#: three paraphrases of the question put to the judge (repeat r asks PROMPTS[r mod 3])
PROMPTS = (
    "Question: {question}\nGold answer(s): {answers}\nCandidate answer: {prediction}\n\n"
    "Does the candidate answer give the same answer as the gold answer? Reply Yes or No.",
    "Here is a question and its correct answer(s).\nQuestion: {question}\nCorrect: {answers}\n\n"
    "Someone answered: {prediction}\nIs that answer correct? Reply Yes or No.",
    "Judge an answer to a quiz question.\nThe question: {question}\nAccepted answers: {answers}\n"
    "The answer given: {prediction}\n\nShould the answer given be marked correct? Reply Yes or No.",
)


class Correctness(Judge):
    name = "correctness"
    description = "does the prediction answer the question, given the gold answers? p(Yes) vs p(No)"
    n_prompts = len(PROMPTS)
    requires = frozenset({"continuation_logprobs"})

    def p_yes(self, examples, prompt):
        prompts = [self.model.chat_prompt(PROMPTS[prompt].format(
            question=e.question, answers=" | ".join(e.answers), prediction=e.prediction or "(no answer)"))
            for e in examples]
        logprobs = self.model.continuation_logprobs([*prompts, *prompts], ["Yes"] * len(prompts) + ["No"] * len(prompts))
        yes, no = logprobs[:len(prompts)], logprobs[len(prompts):]
        return [(yes_probability(float(y.sum()), float(n.sum())),
                 {"logprob_yes": float(y.sum()), "logprob_no": float(n.sum())}) for y, n in zip(yes, no)]


@hookimpl
def register_judges(register):
    register(Correctness)
