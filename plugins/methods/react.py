"""`react`: a search agent that reasons and acts (Yao et al., 2023, "ReAct: Synergizing Reasoning
and Acting in Language Models", ICLR; the same loop as Search-R1's, Jin et al., 2025, without
its training).

Each step the model writes a thought and an action: `Search[query]` retrieves `--n-docs`
passages, which come back as the next observation, and `Finish[answer]` ends with the answer.
At most `--max-steps` actions. A step without a well-formed action is counted
(`malformed_actions_per_question`) and answered with an observation that says what an action
looks like; it never ends the run. A question that never finishes is answered by the task's own
prompt with the passages of the last search, as the ReAct paper backs off to a reader.

What differs from the paper: its actions search and look up Wikipedia pages through an API;
here `Search` asks the run's retriever and there is no `Lookup`; the demonstrations are this
project's, three short ones; steps are not numbered; whatever the model writes after its action
(an observation of its own) is dropped.
"""

from __future__ import annotations

import re
from typing import Any

from raghub import Answer, Method, Option, hookimpl, read_unstated, stated_share

#: an action and its argument, on one line
ACTION = re.compile(r"\b(Search|Finish)\[([^\]\n]*)\]")
INVALID = "Invalid action. Write Action: Search[query] or Action: Finish[answer]."
#: the most tokens of one step (its thought and action)
STEP_TOKENS = 48
INSTRUCTION = ("Answer the question by searching. Each step, write a thought, then an action: Search[query] to "
               "read passages, or Finish[answer] to answer with a short phrase.")
DEMONSTRATIONS = (
    "Question: Where was the author of Dracula born?\n"
    "Thought: I need the author of Dracula.\nAction: Search[author of Dracula]\n"
    "Observation: [Dracula] Dracula is an 1897 novel by the Irish author Bram Stoker.\n"
    "Thought: Now I need where Bram Stoker was born.\nAction: Search[Bram Stoker birthplace]\n"
    "Observation: [Bram Stoker] Bram Stoker was born in Clontarf, Dublin, in 1847.\n"
    "Thought: He was born in Dublin.\nAction: Finish[Dublin]",
    "Question: Is Mount Everest higher than K2?\n"
    "Thought: I need the height of each.\nAction: Search[Mount Everest height]\n"
    "Observation: [Mount Everest] Mount Everest is 8,849 metres high.\n"
    "Thought: Now the height of K2.\nAction: Search[K2 height]\n"
    "Observation: [K2] K2 is 8,611 metres high.\n"
    "Thought: 8,849 metres is more than 8,611 metres.\nAction: Finish[yes]",
    "Question: What is the capital of Italy?\nThought: I know this one.\nAction: Finish[Rome]",
)


def observation(passages) -> str:
    """Passages as one observation line: '[title] text ...'."""
    return " ".join(f"[{p.title}] {p.text}".replace("\n", " ") for p in passages) or "Nothing was found."


class ReAct(Method):
    name = "react"
    families = frozenset({"qa"})
    description = "ReAct: a search agent whose actions search the corpus or finish with an answer"
    first_stage = False
    options = {
        "max_steps": Option(int, 4, "the most steps per question: sentences written (ircot, flare), follow-up "
                                    "questions (self-ask) or actions (react)", at_least=1, at_most=20),
    }

    def answer(self, questions, retrieved):
        """The agents of the batch, a step at a time: one batched generation of every open
        agent's thought and action, then one batched retrieval for its searches."""
        transcripts = ["" for _ in questions]
        passages: list[list] = [[] for _ in questions]
        answers: list[str | None] = [None] * len(questions)
        for _ in range(self.settings["max_steps"]):
            acting = [i for i, answer in enumerate(answers) if answer is None]
            if not acting:
                break
            steps = self.generate([questions[i] for i in acting],
                                  [self.prompt(questions[i], transcripts[i]) for i in acting], STEP_TOKENS)
            searches = {}
            for i, step in zip(acting, steps):
                action = ACTION.search(step.text)
                if action is None:
                    self.counters["malformed_actions"] += 1
                    first_line = step.text.strip().split("\n")[0]
                    transcripts[i] += f"Thought: {first_line}\nObservation: {INVALID}\n"
                    continue
                thought = " ".join(step.text[: action.start()].strip().removesuffix("Action:").split())
                transcripts[i] += f"Thought: {thought}\nAction: {action.group(0)}\n"
                if action.group(1) == "Finish":
                    answers[i] = action.group(2).strip()
                else:
                    searches[i] = action.group(2).strip()
            if searches:
                hits = self.retrieve([questions[i] for i in searches], list(searches.values()), self.n_docs)
                for i, found in zip(searches, hits):
                    passages[i] = [hit.passage for hit in found]
                    transcripts[i] += f"Observation: {observation(passages[i])}\n"
        return self.finish(questions, passages, transcripts, answers)

    def prompt(self, question, transcript) -> str:
        """The demonstrations and the question, then the steps so far and the next thought."""
        blocks = [*DEMONSTRATIONS, f"Question: {question.question}"]
        return question.template.frame(INSTRUCTION, blocks, f"{transcript}Thought:")

    def finish(self, questions, passages, transcripts, answers) -> list[Answer]:
        """Each Finish's answer, and the reader's (over the passages of the last search) for the
        agents that never finished (`read_unstated`); each carries its steps."""
        read = read_unstated(self, questions, passages, answers, [text.rstrip("\n") for text in transcripts])
        return [Answer(answer, answer.generation.strip()) for answer in read]
    def run_stats(self) -> dict[str, Any]:
        """How often an agent finished, and its malformed actions per question."""
        share = stated_share(self.counters)
        if share is None:
            return {}
        return {"finish_rate": share, "malformed_actions_per_question": self.counters["malformed_actions"] / self.counters["questions"]}


@hookimpl
def register_methods(register):
    register(ReAct)
