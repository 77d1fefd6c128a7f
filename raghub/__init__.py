"""raghub: an evaluation harness for retrieval-augmented generation.

The public API a plugin is written against::

    from raghub import hookimpl, Method, Retriever, Reranker, Refiner, Task, Option, Passage, Retrieved
    from raghub import Window, Question, Answer, LanguageModel, ModelBackend, UsageError

A task family asks a method through its family's checked contract (`answers_from`,
`logprobs_from`); `read_task_definition` reads a task YAML as `register_tasks` takes it.
"""

from importlib.metadata import PackageNotFoundError, version

from raghub.distributed import notice
from raghub.errors import RaghubError, RunError, UsageError
from raghub.families.lm import Window, logprobs_from, passage_ids, passage_logprobs, passages_prefix, score_after_prefixes
from raghub.families.qa import (Answer, PromptTemplate, Question, answer_after, answer_continuation, answer_questions,
                                answers_from, first_sentence, generate_for, passage_blocks)
from raghub.hookspecs import hookimpl
from raghub.interfaces import Augmenter, Example, Method, Passage, Retrieved, Retriever, Task
from raghub.mixture import mixture_logprobs
from raghub.models import AnswerScores, Generation, LanguageModel, ModelBackend, load_model
from raghub.objectives import (Objective, lsr_kl, rag_sequence_logprob, rag_sequence_token_logprobs,
                               rag_token_logprob)
from raghub.options import Option
from raghub.schema import Field
from raghub.settings import read_task_definition
from raghub.stages import Refiner, Reranker, reciprocal_rank_fusion

try:
    __version__ = version("raghub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Answer", "AnswerScores", "Augmenter", "Example", "Field", "Generation", "LanguageModel", "Method", "ModelBackend",
    "Objective", "Option", "Passage", "PromptTemplate", "Question", "RaghubError", "Refiner", "Reranker", "Retrieved",
    "Retriever",
    "RunError", "Task", "UsageError", "Window", "answer_after", "answer_continuation", "answer_questions",
    "answers_from", "first_sentence", "generate_for", "hookimpl", "load_model", "logprobs_from", "lsr_kl",
    "mixture_logprobs", "notice", "passage_blocks", "passage_ids", "passage_logprobs", "passages_prefix",
    "rag_sequence_logprob", "rag_sequence_token_logprobs", "rag_token_logprob", "read_task_definition",
    "reciprocal_rank_fusion",
    "score_after_prefixes",
]
