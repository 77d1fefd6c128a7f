"""`ircot`: interleaving retrieval with chain-of-thought reasoning (Trivedi et al., 2023,
"Interleaving Retrieval with Chain-of-Thought Reasoning for Knowledge-Intensive Multi-Step
Questions", ACL).

The question's first-stage passages open the chain. Then, up to `--max-steps` times, the model
writes the next sentence of its chain of thought, with the passages gathered so far in the
prompt; a sentence that does not state the answer is the query of the next retrieval
(`--n-docs` passages), whose new passages join the prompt, at most `--max-passages` in all. The
chain stops at the sentence that says "So the answer is:", and the answer is read from that
line. A chain that never gets there (or stops writing) is answered by the reader: the task's
own prompt with every passage gathered, as IRCoT's retrieve-then-read reader.

What differs from the paper: the demonstrations are this project's, three short chains without
paragraphs (the paper's hold their gold and distractor paragraphs); the reader answers directly
with the task's prompt (the paper also tries a chain-of-thought reader); new passages are
appended in the order retrieved, not merged by score; a "sentence" is the generation up to its
first sentence end or line end, and a line that states the answer is taken whole.
"""

from __future__ import annotations

from typing import Any

from raghub import Answer, Method, Option, answer_after, first_sentence, hookimpl, passage_blocks, read_unstated, stated_share

ANSWER_MARK = "So the answer is:"
#: the most tokens one sentence of the chain may take
SENTENCE_TOKENS = 40
INSTRUCTION = ("Answer the question by reasoning step by step, one sentence at a time, using the passages. "
               f'When you know the answer, write "{ANSWER_MARK}" and a short answer.')
DEMONSTRATIONS = (
    "Question: In which country was the designer of the Eiffel Tower born?\n"
    f"Thought: The Eiffel Tower was designed by Gustave Eiffel. Gustave Eiffel was born in Dijon, France. "
    f"{ANSWER_MARK} France.",
    "Question: Are the Thames and the Seine both rivers?\n"
    f"Thought: The Thames is a river in England. The Seine is a river in France. {ANSWER_MARK} yes.",
    "Question: Which company makes the phone that Steve Jobs unveiled in 2007?\n"
    f"Thought: Steve Jobs unveiled the iPhone in 2007. The iPhone is made by Apple. {ANSWER_MARK} Apple.",
)


class IRCoT(Method):
    name = "ircot"
    families = frozenset({"qa"})
    description = "IRCoT: each new chain-of-thought sentence is the next retrieval query"
    options = {
        "max_steps": Option(int, 4, "the most steps per question: sentences written (ircot, flare), follow-up "
                                    "questions (self-ask) or actions (react)", at_least=1, at_most=20),
        "max_passages": Option(int, 8, "the most passages gathered in the prompt", at_least=1),
    }

    def answer(self, questions, retrieved):
        """The chains of the batch, a step at a time: one batched generation of every open
        chain's next sentence, then one batched retrieval for those that did not answer."""
        cap = self.settings["max_passages"]
        passages = [[hit.passage for hit in hits][:cap] for hits in retrieved]
        thoughts: list[list[str]] = [[] for _ in questions]
        answers: list[str | None] = [None] * len(questions)
        stopped = [False] * len(questions)
        for step in range(1, self.settings["max_steps"] + 1):
            open_chains = [i for i, answer in enumerate(answers) if answer is None and not stopped[i]]
            if not open_chains:
                break
            generations = self.generate([questions[i] for i in open_chains],
                                        [self.prompt(questions[i], passages[i], thoughts[i]) for i in open_chains],
                                        SENTENCE_TOKENS, one_line=True)
            asking = []
            for i, generation in zip(open_chains, generations):
                sentence = first_sentence(generation.text, ANSWER_MARK).strip()
                answers[i] = answer_after(sentence, ANSWER_MARK)
                stopped[i] = not sentence
                if sentence:
                    thoughts[i].append(sentence)
                if sentence and answers[i] is None:
                    asking.append(i)
            if asking and step < self.settings["max_steps"]:
                found = self.retrieve([questions[i] for i in asking], [thoughts[i][-1] for i in asking], self.n_docs)
                for i, hits in zip(asking, found):
                    known = {p.id for p in passages[i]}
                    passages[i] += [hit.passage for hit in hits if hit.passage.id not in known][: cap - len(passages[i])]
        return self.finish(questions, passages, thoughts, answers)

    def prompt(self, question, passages, thoughts) -> str:
        """The demonstrations, the passages and the question, then the chain so far."""
        blocks = [*DEMONSTRATIONS, *passage_blocks(passages), f"Question: {question.question}"]
        return question.template.frame(INSTRUCTION, blocks, " ".join(["Thought:", *thoughts]))

    def finish(self, questions, passages, thoughts, answers) -> list[Answer]:
        """Each stated answer, and the reader's for the others (`read_unstated`), each carrying
        what was written."""
        return read_unstated(self, questions, passages, answers, ["Thought: " + " ".join(own) for own in thoughts])
    def run_stats(self) -> dict[str, Any]:
        """How often a chain stated its answer (the rest were read by the reader)."""
        share = stated_share(self.counters)
        return {"answer_line_rate": share} if share is not None else {}


@hookimpl
def register_methods(register):
    register(IRCoT)
