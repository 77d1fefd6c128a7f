"""raghub: an evaluation harness for retrieval-augmented generation.

The public API a plugin is written against::

    from raghub import hookimpl, Method, Retriever, Task, Option, Passage, Retrieved
    from raghub import Window, Question, Answer, LanguageModel, ModelBackend, UsageError
"""

from importlib.metadata import PackageNotFoundError, version

from raghub.distributed import notice
from raghub.errors import RaghubError, RunError, UsageError
from raghub.families.lm import Window, passage_ids, passage_logprobs, score_after_prefixes
from raghub.families.qa import (Answer, PromptTemplate, Question, answer_after, answer_continuation, answer_questions,
                                first_sentence, generate_for, passage_blocks)
from raghub.hookspecs import hookimpl
from raghub.interfaces import Augmenter, Example, Method, Passage, Retrieved, Retriever, Task
from raghub.mixture import mixture_logprobs
from raghub.models import AnswerScores, Generation, LanguageModel, ModelBackend, load_model
from raghub.objectives import (Objective, lsr_kl, rag_sequence_logprob, rag_sequence_token_logprobs,
                               rag_token_logprob)
from raghub.options import Option
from raghub.schema import Field

try:
    __version__ = version("raghub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Answer", "AnswerScores", "Augmenter", "Example", "Field", "Generation", "LanguageModel", "Method", "ModelBackend",
    "Objective", "Option", "Passage", "PromptTemplate", "Question", "RaghubError", "Retrieved", "Retriever",
    "RunError", "Task", "UsageError", "Window", "answer_after", "answer_continuation", "answer_questions", "first_sentence",
    "generate_for", "hookimpl", "load_model", "lsr_kl", "mixture_logprobs", "notice", "passage_blocks", "passage_ids",
    "passage_logprobs", "rag_sequence_logprob", "rag_sequence_token_logprobs", "rag_token_logprob",
    "score_after_prefixes",
]
