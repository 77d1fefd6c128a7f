"""raghub: an evaluation harness for retrieval-augmented generation.

The public API a plugin is written against (a plugin imports `raghub` and the kits,
`raghub.kits`, nothing else of raghub)::

    from raghub import hookimpl, Method, Retriever, Reranker, Refiner, Task, Option, Passage, Retrieved
    from raghub import Window, Question, Answer, LanguageModel, ModelBackend, UsageError

A task family asks a method through its family's checked contract (`answers_from`,
`logprobs_from`); `read_task_definition` reads a task YAML as `register_tasks` takes it.
Besides the interfaces: the metrics, the cache, the data readers, the checkpoint layout of
`raghub train` and the process group of a distributed run.
"""

from importlib.metadata import PackageNotFoundError, version

from raghub.cache import Cache, cache_root, file_sha256, fingerprint
from raghub.checkpoints import (CHECKPOINT_OPTION, GENERATOR, MANIFEST, PASSAGE_ENCODER, QUERY_ENCODER, TRAIN_LOG,
                                TRAINER_STATE, load_trained_generator, read_checkpoint, write_checkpoint)
from raghub.corpus import STRUCTURED_SUFFIXES, read_corpus, tsv_reader
from raghub.data import load_hub_dataset
from raghub.distributed import barrier, mean_over_ranks, notice, ranks
from raghub.errors import RaghubError, RunError, UsageError
from raghub.families.lm import Window, logprobs_from, passage_ids, passage_logprobs, passages_prefix, score_after_prefixes
from raghub.families.qa import (TEMPLATE_STYLES, Answer, PromptTemplate, Question, answer_after, answer_continuation,
                                answer_questions, answers_from, first_sentence, generate_for, passage_blocks,
                                read_unstated, stated_share)
from raghub.hookspecs import hookimpl
from raghub.interfaces import Example, Method, Passage, Registry, Retrieved, Retriever, Task
from raghub.judges import Judge, Judgeable
from raghub.metrics import (answer_match, best_over_aliases, bits_per_byte, exact_match, f1, mean, nats_per_token,
                            normalize_answer, perplexity, perplexity_standard_error, yes_probability)
from raghub.mixture import mixture_logprobs
from raghub.models import AnswerScores, Generation, LanguageModel, ModelBackend, ModelSpec, choose_backend
from raghub.resolution import answered_questions, question_task
from raghub.retrieval import task_corpus
from raghub.objectives import (Objective, lsr_kl, rag_sequence_logprob, rag_sequence_token_logprobs,
                               rag_token_logprob)
from raghub.options import Option
from raghub.progress import ModelProgress
from raghub.schema import Field
from raghub.settings import (CORE_OPTIONS, data_file, data_is_local, data_path, parse_key_values, read_data_json, read_data_json_lines,
                             read_data_text, read_task_definition)
from raghub.worklog import first_words
from raghub.stages import Refiner, Reranker, reciprocal_rank_fusion

try:
    __version__ = version("raghub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    # the plugin kinds and what flows between them
    "Example", "Field", "LanguageModel", "Method", "ModelBackend", "ModelProgress", "ModelSpec", "Objective", "Option", "Passage",
    "Refiner", "Registry", "Reranker", "Retrieved", "Retriever", "Task", "choose_backend", "hookimpl",
    # errors and notices
    "RaghubError", "RunError", "UsageError", "notice",
    # the language-modelling family's contract
    "Window", "logprobs_from", "passage_ids", "passage_logprobs", "passages_prefix", "score_after_prefixes",
    # the QA family's contract
    "Answer", "AnswerScores", "Generation", "PromptTemplate", "Question", "TEMPLATE_STYLES", "answer_after",
    "answer_continuation", "answer_questions", "answers_from", "first_sentence", "generate_for", "passage_blocks",
    "read_unstated", "stated_share",
    # the formulas methods and training share
    "lsr_kl", "mixture_logprobs", "reciprocal_rank_fusion", "rag_sequence_logprob", "rag_sequence_token_logprobs", "rag_token_logprob",
    # judges of answers
    "Judge", "Judgeable", "yes_probability",
    # metrics
    "answer_match", "best_over_aliases", "bits_per_byte", "exact_match", "f1", "mean", "nats_per_token", "normalize_answer",
    "perplexity", "perplexity_standard_error",
    # data, settings and the cache
    "CORE_OPTIONS", "Cache", "STRUCTURED_SUFFIXES", "cache_root", "data_file", "data_is_local", "data_path", "file_sha256", "fingerprint",
    "load_hub_dataset", "parse_key_values", "read_corpus", "read_data_json", "read_data_json_lines",
    "read_data_text", "read_task_definition", "tsv_reader", "first_words",
    # the task lookup `raghub run`, `score` and `train` share
    "answered_questions", "question_task", "task_corpus",
    # the checkpoint of `raghub train`
    "CHECKPOINT_OPTION", "GENERATOR", "MANIFEST", "PASSAGE_ENCODER", "QUERY_ENCODER", "TRAINER_STATE", "TRAIN_LOG",
    "load_trained_generator", "read_checkpoint", "write_checkpoint",
    # a distributed run's process group
    "barrier", "mean_over_ranks", "ranks",
]
