"""`self-ask`: the model asks itself follow-up questions, each answered with retrieval (Press et
al., 2023, "Measuring and Narrowing the Compositionality Gap in Language Models", Findings of
EMNLP; its Self-Ask + Search Engine form).

The model writes its reply a line at a time after "Are follow up questions needed here:". Each
"Follow up: ..." line is the query of a retrieval (`--n-docs` passages, which replace the
previous ones in the prompt), and the model then writes the "Intermediate answer:" with those
passages before it; at most `--max-steps` follow-ups. The answer is read from the line "So the
final answer is: ...". A reply that never gets there (more follow-ups than allowed, a line of
another form, or nothing) is answered by the task's own prompt with the passages retrieved last.

What differs from the paper: the intermediate answer is the model's own, read from the retrieved
passages, where the paper pastes the search engine's answer box; the demonstrations are this
project's, three short ones; the model writes one line per generation, so that each follow-up
is retrieved before its answer is written.
"""

from __future__ import annotations

from typing import Any

from raghub import Answer, Method, Option, answer_after, hookimpl, passage_blocks, read_unstated, stated_share

NEEDED = "Are follow up questions needed here:"
FOLLOW_UP = "Follow up:"
INTERMEDIATE = "Intermediate answer:"
FINAL = "So the final answer is:"
#: the most tokens of one line of the reply
LINE_TOKENS = 32
INSTRUCTION = ("Answer the question. If it needs other facts first, ask them as follow up questions, one per "
               f'line, each answered after "{INTERMEDIATE}"; end with "{FINAL}" and a short answer.')
DEMONSTRATIONS = (
    f"Question: In which country was the director of Jaws born?\n{NEEDED} Yes.\n"
    f"{FOLLOW_UP} Who directed Jaws?\n{INTERMEDIATE} Steven Spielberg.\n"
    f"{FOLLOW_UP} In which country was Steven Spielberg born?\n{INTERMEDIATE} the United States.\n"
    f"{FINAL} the United States",
    f"Question: Which river is longer, the Danube or the Volga?\n{NEEDED} Yes.\n"
    f"{FOLLOW_UP} How long is the Danube?\n{INTERMEDIATE} about 2,850 km.\n"
    f"{FOLLOW_UP} How long is the Volga?\n{INTERMEDIATE} about 3,530 km.\n"
    f"{FINAL} the Volga",
    f"Question: What is the capital of France?\n{NEEDED} No.\n{FINAL} Paris",
)


class SelfAsk(Method):
    name = "self-ask"
    families = frozenset({"qa"})
    description = "Self-Ask: follow-up questions, each answered from the passages retrieved for it"
    first_stage = False
    options = {
        "max_steps": Option(int, 4, "the most steps per question: sentences written (ircot, flare), follow-up "
                                    "questions (self-ask) or actions (react)", at_least=1, at_most=20),
    }

    def answer(self, questions, retrieved):
        """The replies of the batch, a line at a time (one batched generation per round, and one
        batched retrieval for the follow-ups asked in it); at most 2 * max_steps + 2 rounds."""
        replies = [NEEDED for _ in questions]
        passages: list[list] = [[] for _ in questions]
        follow_ups = [0] * len(questions)
        answers: list[str | None] = [None] * len(questions)
        stopped = [False] * len(questions)
        for _ in range(2 * self.settings["max_steps"] + 2):
            writing = [i for i, answer in enumerate(answers) if answer is None and not stopped[i]]
            if not writing:
                break
            lines = self.generate([questions[i] for i in writing],
                                  [self.prompt(questions[i], passages[i], replies[i]) for i in writing],
                                  LINE_TOKENS, one_line=True)
            asking = {}
            for i, generated in zip(writing, lines):
                line = generated.text.strip().split("\n")[0]
                if line.startswith(FINAL):
                    replies[i] += line
                    answers[i] = answer_after(line, FINAL)
                elif line.startswith(FOLLOW_UP) and follow_ups[i] < self.settings["max_steps"]:
                    follow_ups[i] += 1
                    replies[i] += f"{line}\n{INTERMEDIATE}"
                    asking[i] = line.removeprefix(FOLLOW_UP).strip()
                elif line and not line.startswith(FOLLOW_UP) and replies[i].endswith((NEEDED, INTERMEDIATE)):
                    replies[i] += f" {line}\n"  # the yes / no, or the intermediate answer
                else:  # nothing, a line of another form, or a follow-up too many
                    stopped[i] = True
            if asking:
                hits = self.retrieve([questions[i] for i in asking], list(asking.values()), self.n_docs)
                for i, found in zip(asking, hits):
                    passages[i] = [hit.passage for hit in found]
        return self.finish(questions, passages, replies, answers)

    def prompt(self, question, passages, reply) -> str:
        """The demonstrations, the passages of the last follow-up and the question, then the
        reply so far."""
        blocks = [*DEMONSTRATIONS, *passage_blocks(passages), f"Question: {question.question}"]
        return question.template.frame(INSTRUCTION, blocks, reply)

    def finish(self, questions, passages, replies, answers) -> list[Answer]:
        """Each final answer, and the reader's for the replies without one (`read_unstated`)."""
        return read_unstated(self, questions, passages, answers, replies)
    def run_stats(self) -> dict[str, Any]:
        """How often a reply ended with "So the final answer is:"."""
        share = stated_share(self.counters)
        return {"answer_line_rate": share} if share is not None else {}


@hookimpl
def register_methods(register):
    register(SelfAsk)
