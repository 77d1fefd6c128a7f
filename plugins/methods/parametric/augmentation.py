"""Parametric RAG's self-augmentation: the model rewrites each passage and writes QA pairs
about it; those become the passage's five training examples (PRAG's recipe, or a few-shot
completion style for models too small to write PRAG's JSON)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

from raghub import Passage, Question

REWRITE_PROMPT = (
    "Rewrite the following passage. While keeping the entities, proper nouns, and key details such "
    "as names, locations, and terminology intact, create a new version of the text that expresses "
    "the same ideas in a different way. Make sure the revised passage is distinct from the "
    "original one, but preserves the core meaning and relevant information.\n{passage}"
)
QA_PROMPT = (
    "I will provide a passage of text, and you need to generate three different questions based "
    "on the content of this passage. Each question should be answerable using the information "
    "provided in the passage. Additionally, please provide an appropriate answer for each question "
    "derived from the passage.\n"
    "You need to generate the question and answer in the following format:\n"
    "[\n"
    "    {{\n"
    '        "question": "What is the capital of France?",\n'
    '        "answer": "Paris"\n'
    '        "full_answer": "The capital of France is Paris."\n'
    "    }}, \n"
    "]\n\n"
    "This list should have at least three elements. You only need to output this list in the "
    "above format.\n"
    "Passage:\n"
    "{passage}"
)
QA_PAIRS_PER_PASSAGE = 3
EXAMPLE_QUESTION = "What is the capital of France?"
_MISSING_COMMA = re.compile(r'"[ \t]*\n(\s*")')
TARGET = "The answer is {answer}"

# The "fewshot" style: plain completions after one worked example, which models too small to
# follow PRAG's JSON instructions (SmolLM2-135M parses on almost no passage) still continue.
# Each of the three questions is asked for separately, started with its own question word: left
# to write all three at once, SmolLM2-135M stops after one or two, or repeats a question.
FEWSHOT_PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built it for the 1889 "
    "World's Fair."
)
FEWSHOT_REWRITE_PROMPT = (
    f"Passage: {FEWSHOT_PASSAGE}\n"
    "Paraphrase: Built for the 1889 World's Fair by the company of the engineer Gustave Eiffel, "
    "after whom it is named, the Eiffel Tower is a lattice tower of wrought iron that stands on "
    "the Champ de Mars in Paris, France.\n\n"
    "Passage: {passage}\nParaphrase:"
)
FEWSHOT_PAIRS = (("In which city is the Eiffel Tower?", "Paris"),
                 ("After whom is the Eiffel Tower named?", "Gustave Eiffel"),
                 ("For which event was the Eiffel Tower built?", "the 1889 World's Fair"))
FEWSHOT_QA_PROMPT = (
    f"Passage: {FEWSHOT_PASSAGE}\n"
    + "".join(f"Question: {question}\nAnswer: {answer}\n" for question, answer in FEWSHOT_PAIRS)
    + "\nPassage: {passage}\nQuestion:"
)
_FEWSHOT_PAIR = re.compile(r"Question:[ \t]*(?P<question>[^\n]*?\S)[ \t]*\nAnswer:[ \t]*(?P<answer>[^\n]*\S)")


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    full_answer: str


@dataclass(frozen=True)
class Augmentation:
    """A passage's self-augmentation; no `qa_pairs` means the QA output never parsed."""

    rewrite: str
    qa_pairs: tuple[QAPair, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Augmentation":
        return cls(data["rewrite"], tuple(QAPair(**pair) for pair in data["qa_pairs"]))


def _short_answer(value: Any) -> str:
    """PRAG's repairs: a list of answers joined by commas, a number as text, null as Unknown."""
    if value is None:
        return "Unknown"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


def parse_qa_pairs(generated: str) -> tuple[QAPair, ...]:
    """The first three QA pairs found in a generation, () when there are fewer.

    Lenient, in the spirit of PRAG's per-model JSON fixes: every JSON object in the text with a
    "question" and an "answer" counts, wherever the list brackets are; a missing comma between
    two lines (the prompt's own example lacks one) is repaired; `full_answer` defaults to the
    answer (only chain-of-thought training uses it); the prompt's example pair is ignored."""
    text = _MISSING_COMMA.sub(r'",\n\1', generated)
    decoder = json.JSONDecoder()
    pairs: list[QAPair] = []
    position = text.find("{")
    while position >= 0 and len(pairs) < QA_PAIRS_PER_PASSAGE:
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            position = text.find("{", position + 1)
            continue
        if isinstance(item, dict) and {"question", "answer"} <= item.keys() and item["question"] != EXAMPLE_QUESTION:
            answer = _short_answer(item["answer"])
            pairs.append(QAPair(str(item["question"]), answer, str(item.get("full_answer") or answer)))
        position = text.find("{", end)
    return tuple(pairs) if len(pairs) == QA_PAIRS_PER_PASSAGE else ()


def parse_fewshot_qa_pairs(generated: str) -> tuple[QAPair, ...]:
    """The first three different `Question: ... / Answer: ...` pairs of a few-shot completion
    (which continues the prompt's last "Question:"), () when there are fewer; copies of the
    worked example's questions do not count."""
    seen = {question.lower() for question, _ in FEWSHOT_PAIRS}
    pairs = []
    for match in _FEWSHOT_PAIR.finditer("Question:" + generated):
        if match["question"].lower() in seen:
            continue
        seen.add(match["question"].lower())
        pairs.append(QAPair(match["question"], match["answer"], match["answer"]))
        if len(pairs) == QA_PAIRS_PER_PASSAGE:
            return tuple(pairs)
    return ()


@dataclass(frozen=True)
class AugmentationStyle:
    """How the model is asked for a passage's rewrite and QA pairs, and how its replies are read."""

    rewrite_prompt: str
    qa_prompt: str
    parse_qa: Callable[[str], tuple[QAPair, ...]]
    chat: bool  #: wrap the prompts in the model's chat template (else plain completions)
    stop: tuple[str, ...] = ()  #: generation ends at any of these; every reply is cut there
    #: one QA request per word, each started with it (else one request for all three pairs)
    question_words: tuple[str, ...] = ()

    def _cut(self, generated: str) -> str:
        for stop in self.stop:
            generated = generated.split(stop)[0]
        return generated

    def read_rewrite(self, generated: str) -> str:
        return self._cut(generated).strip()

    def qa_requests(self, passage: str) -> list[str]:
        """The prompts that ask for a passage's QA pairs."""
        prompt = self.qa_prompt.format(passage=passage)
        return [f"{prompt} {word}" for word in self.question_words] or [prompt]

    def read_qa(self, replies: Sequence[str]) -> tuple[QAPair, ...]:
        """A passage's QA pairs from the replies to its `qa_requests`, () when they do not parse."""
        if not self.question_words:
            return self.parse_qa(replies[0])
        return self.parse_qa("\nQuestion:".join(f" {word}{self._cut(reply)}"
                                                 for word, reply in zip(self.question_words, replies)))


AUGMENTATION_STYLES = {
    "prag": AugmentationStyle(REWRITE_PROMPT, QA_PROMPT, parse_qa_pairs, chat=True),
    "fewshot": AugmentationStyle(FEWSHOT_REWRITE_PROMPT, FEWSHOT_QA_PROMPT, parse_fewshot_qa_pairs,
                                 chat=False, stop=("\n\n", "\nQuestion:"), question_words=("What", "Who", "When")),
}


def augment_passages(texts: Sequence[str], generate: Callable[[list[str], int], list[str]],
                     retries: int, style: AugmentationStyle = AUGMENTATION_STYLES["prag"]) -> list[Augmentation]:
    """One rewrite and three QA pairs per passage. `generate(prompts, attempt)` returns one
    generation per prompt; the QA request of a passage whose output does not parse is
    repeated up to `retries` more times (with a new sampling seed per attempt)."""
    rewrites = generate([style.rewrite_prompt.format(passage=text) for text in texts], 0)
    qa_pairs: list[tuple[QAPair, ...]] = [()] * len(texts)
    pending = list(range(len(texts)))
    for attempt in range(retries + 1):
        requests = [style.qa_requests(texts[i]) for i in pending]
        replies = iter(generate([prompt for prompts in requests for prompt in prompts], attempt))
        for index, prompts in zip(pending, requests):
            qa_pairs[index] = style.read_qa([next(replies) for _ in prompts])
        pending = [i for i in pending if not qa_pairs[i]]
        if not pending:
            break
    return [Augmentation(style.read_rewrite(rewrite), pairs) for rewrite, pairs in zip(rewrites, qa_pairs)]


def _as_question(text: str) -> str:
    """PRAG's question clean-up: stripped, ending in "?" with no space before it."""
    text = text.strip().removesuffix("?").strip()
    return text + "?"


def training_texts(question: Question, passage: Passage, augmentation: Augmentation) -> list[tuple[str, str]]:
    """The five (prompt, target) pairs of a passage, in `question`'s prompt format: QA pairs
    1-2 each with the passage and with the rewrite, then QA pair 3 with no passage."""
    rewrite = Passage(id=f"{passage.id}-rewrite", text=augmentation.rewrite)
    first, second, third = augmentation.qa_pairs
    contexts = [(first, [passage]), (first, [rewrite]), (second, [passage]), (second, [rewrite]), (third, [])]
    return [(replace(question, question=_as_question(pair.question)).prompt(passages),
             TARGET.format(answer=pair.answer.strip().removesuffix(".") + "."))
            for pair, passages in contexts]


def template_probe(question: Question) -> str:
    """The question's prompt template, rendered with placeholders (part of adapter cache keys)."""
    return replace(question, question="{question}").prompt([Passage(id="", text="{passage}")])
