"""`flare`: forward-looking active retrieval (Jiang et al., 2023, "Active Retrieval Augmented
Generation", EMNLP), its direct form FLARE-direct.

The answer is written a sentence at a time, up to `--max-steps` sentences. Each step first
generates a look-ahead sentence without passages. If every one of its tokens has probability at
least `--threshold`, it is kept. Otherwise the sentence, masked of its low-probability tokens
(the whole words that hold one), is the query of a retrieval (`--n-docs` passages; the question
when nothing is left of it), and the sentence is generated again with those passages in the
prompt and kept. The answer is read
from the sentence that says "So the answer is:"; a question whose answer never gets there (or
stops writing) is answered by the task's own prompt with the passages retrieved last.

What differs from the paper: no retrieval with the question before the first sentence, as in
FlashRAG's FLARE (every retrieval is triggered by an unsure sentence); the demonstrations are
this project's, three short chains of thought; the fallback answer for an unfinished chain is
this project's (the paper's output is the whole generation); a "sentence" is the generation up
to its first sentence end or line end, and a line that states the answer is taken whole; the
mask drops whole words, not the pieces of a word that its tokenizer split (a BM25 query of
half-words finds nothing). The tokens' probabilities are those of `Generation.token_logprobs`;
a backend that gives no token ids (or not one per log-prob) gets its sentence unmasked as the
query.
"""

from __future__ import annotations

import math
from typing import Any

from raghub import Answer, Method, Option, answer_after, first_sentence, hookimpl, passage_blocks, read_unstated, stated_share

ANSWER_MARK = "So the answer is:"
#: the most tokens of a look-ahead (one sentence is kept of it)
SENTENCE_TOKENS = 40
INSTRUCTION = ("Answer the question by reasoning step by step, one sentence at a time, using the passages when "
               f'there are any. End with "{ANSWER_MARK}" and a short answer.')
DEMONSTRATIONS = (
    "Question: Who was older, the composer of The Magic Flute or the composer of Fidelio?\n"
    "Answer: The Magic Flute was composed by Mozart, born in 1756. Fidelio was composed by Beethoven, "
    f"born in 1770. {ANSWER_MARK} Mozart.",
    "Question: In which town was the author of Hamlet born?\n"
    "Answer: Hamlet was written by William Shakespeare. William Shakespeare was born in Stratford-upon-Avon. "
    f"{ANSWER_MARK} Stratford-upon-Avon.",
    "Question: Is the Nile longer than the Rhine?\n"
    f"Answer: The Nile is about 6,650 km long. The Rhine is about 1,230 km long. {ANSWER_MARK} yes.",
)


class Flare(Method):
    name = "flare"
    families = frozenset({"qa"})
    description = "FLARE: retrieve when the next sentence has an unlikely token, with that sentence as the query"
    first_stage = False
    options = {
        "threshold": Option(float, 0.4, "a token probability below which the model counts as unsure (flare: any "
                                        "token of the next sentence; adaptive: the answer's geometric mean)",
                            above=0, at_most=1),
        "max_steps": Option(int, 4, "the most steps per question: sentences written (ircot, flare), follow-up "
                                    "questions (self-ask) or actions (react)", at_least=1, at_most=20),
    }

    def answer(self, questions, retrieved):
        """The answers of the batch, a sentence at a time: one batched look-ahead of every open
        answer, then one batched retrieval and regeneration for the unsure ones."""
        sentences: list[list[str]] = [[] for _ in questions]
        passages: list[list] = [[] for _ in questions]
        answers: list[str | None] = [None] * len(questions)
        stopped = [False] * len(questions)
        for _ in range(self.settings["max_steps"]):
            writing = [i for i, answer in enumerate(answers) if answer is None and not stopped[i]]
            if not writing:
                break
            looks = self.generate([questions[i] for i in writing],
                                  [self.prompt(questions[i], [], sentences[i]) for i in writing],
                                  SENTENCE_TOKENS, one_line=True)
            unsure = {}
            for i, look in zip(writing, looks):
                sentence, query = self.judge(look)
                if query is None:
                    stopped[i], answers[i] = self.keep(sentences[i], sentence)
                else:
                    unsure[i] = query or questions[i].question
            if unsure:
                hits = self.retrieve([questions[i] for i in unsure], list(unsure.values()), self.n_docs)
                for i, found in zip(unsure, hits):
                    passages[i] = [hit.passage for hit in found]
                again = self.generate([questions[i] for i in unsure],
                                      [self.prompt(questions[i], passages[i], sentences[i]) for i in unsure],
                                      SENTENCE_TOKENS, one_line=True)
                for i, generation in zip(unsure, again):
                    stopped[i], answers[i] = self.keep(sentences[i], first_sentence(generation.text, ANSWER_MARK))
        return self.finish(questions, passages, sentences, answers)

    def prompt(self, question, passages, sentences) -> str:
        """The demonstrations, the passages and the question, then the answer so far."""
        blocks = [*DEMONSTRATIONS, *passage_blocks(passages), f"Question: {question.question}"]
        return question.template.frame(INSTRUCTION, blocks, " ".join(["Answer:", *sentences]))

    def judge(self, look) -> tuple[str, str | None]:
        """The look-ahead's sentence, and None when each of its tokens is likely enough, else
        the sentence without the words that hold an unlikely token (the masked query; '' when
        no word is left)."""
        text = first_sentence(look.text, ANSWER_MARK)  # a prefix of the look-ahead's text
        floor = math.log(self.settings["threshold"])
        sentence = text.strip()
        if len(look.token_ids) != len(look.token_logprobs):  # not one id per token: all judged, no mask
            unsure = any(logprob < floor for logprob in look.token_logprobs)
            return sentence, sentence if sentence and unsure else None
        # the text each token wrote (decoded by prefixes, whatever the tokenizer's spaces), up
        # to the fewest tokens that cover the sentence
        prefixes = [self.model.decode(look.token_ids[:n]) for n in range(len(look.token_ids) + 1)]
        length = next((n for n, prefix in enumerate(prefixes) if len(prefix) >= len(text)), len(look.token_ids))
        words: list[tuple[str, bool]] = []  # each word's text and whether all its tokens are likely
        for n, logprob in enumerate(look.token_logprobs[:length]):
            piece = prefixes[n + 1][len(prefixes[n]):]
            if not words or piece[:1].isspace():
                words.append(("", True))
            words[-1] = (words[-1][0] + piece, words[-1][1] and logprob >= floor)
        if not sentence or all(likely for _, likely in words):
            return sentence, None
        return sentence, "".join(word for word, likely in words if likely).strip()

    def keep(self, sentences: list[str], sentence: str) -> tuple[bool, str | None]:
        """Add a sentence to an answer; whether the answer stopped writing (an empty sentence),
        and the answer it states, if any."""
        sentence = sentence.strip()
        if sentence:
            sentences.append(sentence)
        return not sentence, answer_after(sentence, ANSWER_MARK)

    def finish(self, questions, passages, sentences, answers) -> list[Answer]:
        """Each stated answer, and the reader's for the others (`read_unstated`), each carrying
        what was written."""
        return read_unstated(self, questions, passages, answers, ["Answer: " + " ".join(own) for own in sentences])
    def run_stats(self) -> dict[str, Any]:
        """How often an answer stated itself after "So the answer is:"."""
        share = stated_share(self.counters)
        return {"answer_line_rate": share} if share is not None else {}


@hookimpl
def register_methods(register):
    register(Flare)
