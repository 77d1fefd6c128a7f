"""The question-answering contract: a task hands methods `Question`s, each knowing how to
render its prompt (with or without passages) and how to read an answer out of a generation; a
method returns one answer string per question (`Method.answer`), which may be an `Answer` (a
string that also carries the raw generation, for the samples log). A task asks through
`answers_from`, which checks that contract.

A prompt holds only the passages that fit the model: when the template knows its model, the
lowest-ranked passages are left out until the prompt leaves room for the answer (`fit_passages`),
counted in the run's method_stats and said once on stderr."""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from raghub.errors import ReturnedWrong, RunError, amount
from raghub.interfaces import Example, Method, Passage, Retrieved

if TYPE_CHECKING:  # pragma: no cover
    from raghub.models import Generation, LanguageModel

TEMPLATE_STYLES = ("chat", "completion")
_LEADING_ANSWER_IS = re.compile(r"^\s*(the answer is|answer)\s*:?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class PromptTemplate:
    """How a question (and its passages) becomes the model input.

    `style` is "chat" (the instruction and question in the model's chat template, for instruct
    models) or "completion" (plain text ending in "Answer:"); `few_shot` holds optional
    `{question, answer}` demonstrations placed first (before any passages); `model`, when
    given, is the model the prompts are for, whose length they are fitted to (`fit_passages`).
    """

    style: str = "chat"
    few_shot: tuple[tuple[str, str], ...] = ()
    chat: Callable[[str], str] | None = None
    model: LanguageModel | None = field(default=None, repr=False, compare=False)

    INSTRUCTION = "Answer the question with a short phrase of a few words, and nothing else."

    def render(self, question: str, passages: Sequence[Passage]) -> str:
        blocks = [f"Question: {q}\nAnswer: {a}" for q, a in self.few_shot]
        blocks += [*passage_blocks(passages), f"Question: {question}"]
        return self.frame(self.INSTRUCTION, blocks, "" if self.style == "chat" else "Answer:")

    def frame(self, instruction: str, blocks: Sequence[str], reply: str) -> str:
        """A prompt of this template's style from a method's own parts: in "completion", the
        `blocks` (demonstrations, passages, the question) separated by blank lines, then `reply`
        on the next line; in "chat", the `instruction` and the blocks as the user's message in
        the model's chat template, the assistant's reply starting with `reply`. The model
        continues `reply`."""
        if self.style == "chat":
            body = "\n\n".join([instruction, *blocks])
            return (self.chat(body) if self.chat else body) + reply
        return "\n\n".join(blocks) + (f"\n{reply}" if reply else "")


def passage_blocks(passages: Sequence[Passage]) -> list[str]:
    """Passages as prompt blocks: "Passage 1: title\ntext", ..."""
    return [f"Passage {n}: {p.as_text()}" for n, p in enumerate(passages, 1)]


#: the end of a sentence: a full stop, ! or ? after a lower-case letter, a digit or a closing
#: mark (not an initial such as "U.S." or "F."), followed by a space or the end
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]\"'%])[.!?](?=\s|$)")


def first_sentence(text: str, mark: str | None = None) -> str:
    """`text` up to the end of its first sentence, leading space kept: a line end ends one too.
    A first line that holds `mark` (such as "So the answer is:") is taken whole, so that the
    answer it states ("St. Louis.") is not cut."""
    lead = len(text) - len(text.lstrip())
    line = text[lead:].split("\n")[0]
    end = _SENTENCE_END.search(line)
    return text[:lead] + (line if end is None or (mark and mark in line) else line[: end.end()]).rstrip()


def answer_after(text: str, mark: str) -> str | None:
    """What the first line of `text` holding `mark` (e.g. "So the answer is:") says after it,
    without the full stop that ends it; None when no line holds the mark."""
    line = next((line for line in text.splitlines() if mark in line), None)
    return None if line is None else line.split(mark, 1)[1].strip().removesuffix(".").strip()


class Answer(str):
    """An answer string that also carries the raw generation it was read from; methods may
    return these instead of plain strings so that the samples log shows the generation."""

    generation: str

    def __new__(cls, text: str, generation: str) -> "Answer":
        answer = super().__new__(cls, text)
        answer.generation = generation
        return answer


def extract_answer(generated_text: str) -> str:
    """The first non-empty line of a generation, without a leading "The answer is" / "Answer:"."""
    first_line = next((line for line in generated_text.splitlines() if line.strip()), "")
    return _LEADING_ANSWER_IS.sub("", first_line).strip()


@dataclass
class Question(Example):
    """One QA example: the question, every gold alias, its type, and the gold passages when the
    dataset says which they are (by passage id, or by title for the multi-hop sets)."""

    question: str = ""
    answers: list[str] = field(default_factory=list)
    type: str = ""
    max_new_tokens: int = 32
    gold_passage_ids: list[str] = field(default_factory=list)
    gold_titles: list[str] = field(default_factory=list)
    template: PromptTemplate = field(default_factory=PromptTemplate, repr=False, compare=False)

    def prompt(self, passages: Sequence[Passage]) -> str:
        """The full model input in the task's template, with the passages (best first) that fit
        the template's model (`fit_passages`)."""
        return self.template.render(self.question, fit_passages(self, passages))

    def extract(self, generated_text: str) -> str:
        """The answer from a generation."""
        return extract_answer(generated_text)

    def answer_from(self, generated_text: str) -> Answer:
        """The extracted answer, carrying the generation it came from."""
        return Answer(self.extract(generated_text), generated_text)

    def is_gold(self, passage_id: str, title: str) -> bool:
        """Whether the dataset names this passage (by id) or its title as gold."""
        return passage_id in self.gold_passage_ids or title in self.gold_titles

    def recall(self, retrieved: Sequence[Retrieved]) -> float | None:
        """Fraction of the gold passages (ids) and gold titles found in `retrieved`; None when
        the dataset names no gold passage."""
        n_gold = len(self.gold_passage_ids) + len(self.gold_titles)
        if not n_gold:
            return None
        ids = {r.passage.id for r in retrieved}
        titles = {r.passage.title for r in retrieved}
        hits = sum(i in ids for i in self.gold_passage_ids)
        hits += sum(t in titles for t in self.gold_titles)
        return hits / n_gold


def fit_passages(question: Question, passages: Sequence[Passage]) -> Sequence[Passage]:
    """The most passages, best first, whose prompt leaves the template's model room for the
    question's `max_new_tokens`: the lowest-ranked are left out and counted
    (`LanguageModel.drop_passages`). All of them when the template has no model or the model
    states no length; a RunError when the prompt does not fit even without passages."""
    model = question.template.model
    room = model.max_input_tokens(question.max_new_tokens) if model is not None else None
    if room is None:
        return passages

    def too_long(count: int) -> bool:
        return len(model.encode(question.template.render(question.question, passages[:count]))) > room

    if not too_long(len(passages)):
        return passages
    if too_long(0):
        raise RunError(f"question {question.id}: its prompt is longer than the {room} tokens {model.name} "
                       f"leaves beside {question.max_new_tokens} answer tokens even without passages; "
                       "shorten the task's few_shot or use a model that takes longer inputs")
    kept = bisect.bisect_left(range(len(passages) + 1), True, key=too_long) - 1  # the prompts only grow
    model.drop_passages(len(passages) - kept, f"question {question.id}: its prompt with {len(passages)} "
                                              f"passages is longer than the {room} tokens {model.name} "
                                              "leaves for it")
    return passages[:kept]


def answers_from(method: Method, questions: Sequence[Question],
                 retrieved: Sequence[Sequence[Retrieved]]) -> list[str]:
    """`method.answer` for the questions: one string per question, else a RunError naming the
    method's plugin and what it returned."""
    answers = method.answer(questions, retrieved)
    if not isinstance(answers, (list, tuple)):
        raise ReturnedWrong("method", method, f"{answers!r}; it must return one string per question")
    if len(answers) != len(questions):
        raise ReturnedWrong("method", method,
                            f"{amount(len(answers), 'answer')} for {amount(len(questions), 'question')}")
    for question, answer in zip(questions, answers):
        if not isinstance(answer, str):
            raise ReturnedWrong("method", method, f"{answer!r} for question {question.id}; it must return one "
                                                  "string per question")
    return list(answers)


def answer_continuation(prompt: str, answer: str) -> str:
    """What a model writes after `prompt` to give `answer`: a leading space unless the prompt
    ends in whitespace, then the answer and the newline that ends it (`extract` reads the first
    line). RAG-sequence scores candidates with it, and training learns it."""
    return ("" if prompt[-1:].isspace() else " ") + answer + "\n"


def generate_for(model: LanguageModel, questions: Sequence[Question],
                 passage_lists: Sequence[Sequence[Passage]], one_line: bool = False) -> list[Generation]:
    """Greedy generations, one per question with its passages, in one batched call; with
    `one_line`, each may stop at its first line end (`LanguageModel.generate_line`)."""
    prompts = [q.prompt(p) for q, p in zip(questions, passage_lists)]
    generate = model.generate_line if one_line else model.generate
    return generate(prompts, max(q.max_new_tokens for q in questions))


def answer_questions(model: LanguageModel, questions: Sequence[Question],
                     passage_lists: Sequence[Sequence[Passage]]) -> list[Answer]:
    """The extracted answer of each question, generated with its passages in the prompt and
    stopped at the end of the first line, which is all `Question.extract` reads."""
    generations = generate_for(model, questions, passage_lists, one_line=True)
    return [q.answer_from(g.text) for q, g in zip(questions, generations)]


#: the method counter of the questions whose chain stated no answer of its own (`read_unstated`)
UNSTATED = "answers_read_by_the_reader"


def read_unstated(method: Method, questions: Sequence[Question], passages: Sequence[Sequence[Passage]],
                  answers: Sequence[str | None], written: Sequence[str]) -> list[Answer]:
    """The answers an iterative method's chains stated (None where a chain stated none), each an
    `Answer` carrying what its chain wrote. A question whose chain stated none (or an empty one:
    "So the answer is:" with nothing after it on its line) is answered by its
    task's own prompt over its `passages` (one batched generation through `method.generate`),
    and "Reader:" with that generation is added to what the chain wrote. Counts the questions and
    those read so (`method.counters`: "questions", `UNSTATED`; see `stated_share`)."""
    answers, written = list(answers), list(written)
    unread = [i for i, answer in enumerate(answers) if not answer]
    method.counters["questions"] += len(questions)
    method.counters[UNSTATED] += len(unread)
    if unread:
        generations = method.generate([questions[i] for i in unread], [questions[i].prompt(passages[i]) for i in unread],
                                      max(questions[i].max_new_tokens for i in unread), one_line=True)
        for i, generation in zip(unread, generations):
            answers[i] = questions[i].extract(generation.text)
            written[i] += f"\nReader:{generation.text}"
    return [Answer(answer, text) for answer, text in zip(answers, written)]


def stated_share(counters: Counter[str]) -> float | None:
    """The share of questions whose chain stated its own answer (`read_unstated`); None before any."""
    questions = counters["questions"]
    return 1 - counters[UNSTATED] / questions if questions else None
