"""The model interface every method shares, and the backend plugins that load models.

A `ModelBackend` (registered through `register_models`) turns a `--model` spec (a hub id, a
folder, a file, or None for the embedded default) into a `LanguageModel`. Methods use only the
`LanguageModel` interface: tokenising, scoring token log-probs after a prefix, generating.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from raghub.errors import UsageError
from raghub.interfaces import Plugin, Registry


@dataclass
class Generation:
    """A generated continuation, the log-probability of each generated token and, where the
    backend gives them, the tokens' ids (decoded one by one, what each token wrote)."""

    text: str
    token_logprobs: list[float]
    token_ids: list[int] = field(default_factory=list)


@dataclass
class AnswerScores:
    """What training needs of a model's answers (`LanguageModel.answer_scores`), with
    gradients: each answer token's ln p given its prompt, the log-probs over the vocabulary at
    those positions, the answer token ids, and the tokens that end an answer."""

    token_logprobs: Any  # [N, T] float32, zero past each answer's length
    position_logprobs: list[Any]  # per answer, [its length, vocabulary]
    targets: list[list[int]]
    stop_ids: list[int]


class LanguageModel(ABC):
    """A language model and its (Hugging Face style) tokenizer, with batched scoring and
    greedy generation. `name` is what records show; `fingerprint` identifies the weights and
    tokenizer by content (a run's resume key and its record carry it), the name when empty."""

    def __init__(self, tokenizer: Any, name: str, batch_size: int = 8, fingerprint: str = ""):
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.fingerprint = fingerprint or name
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user_message: str) -> str:
        """`user_message` wrapped in the model's chat template, ready for the reply."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    @property
    @abstractmethod
    def device(self) -> Any:
        """The torch device the model runs on."""

    @property
    @abstractmethod
    def dtype(self) -> str:
        """The weights' dtype, e.g. 'float32'."""

    @abstractmethod
    def sequence_logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Any]:
        """For each sequence, float32 log p(seq[t] | seq[:t]) for t in [start, len); start >= 1."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy continuations of `prompts` (stopping at end of text)."""

    def generate_line(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy continuations that may stop at their first newline after non-space text,
        which is all a one-line answer needs; by default the full `generate`."""
        return self.generate(prompts, max_new_tokens)

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Any]:
        """ln p of each continuation's tokens given its prompt (float32 tensors), in one batched
        call: what RAG-sequence scores a candidate answer with. Prompt and continuation are
        tokenised apart, so a continuation starts on a token boundary (give it its leading
        space when the prompt does not end in one)."""
        prompt_ids = [self.encode(prompt) for prompt in prompts]
        sequences = [ids + self.encode(text) for ids, text in zip(prompt_ids, continuations)]
        return self.sequence_logprobs(sequences, [len(ids) for ids in prompt_ids])

    def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> AnswerScores:
        """The answers given their prompts, as training learns them, in one forward pass that
        keeps gradients; a model that cannot be trained says so."""
        raise UsageError(f"model {self.name!r} cannot be trained: its backend has no answer_scores")

    def hardware(self) -> dict[str, Any]:
        """Where the model runs, for the record."""
        return {"device": str(self.device), "dtype": self.dtype}


class ModelBackend(Plugin, ABC):
    """Loads models of one kind. The runner asks the backends, third-party ones first, which
    `handles` the `--model` spec (or uses `--model-backend NAME`); `options` are the keys
    `--model-args key=value,...` accepts."""

    #: one line for `raghub models`: which specs this backend loads
    handles_description: ClassVar[str] = ""
    #: whether its models score text token by token (`sequence_logprobs`): False for an
    #: encoder-decoder backend, which the runner then refuses for tasks that need it
    causal: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        self.settings = self.resolve_options(options)

    @classmethod
    @abstractmethod
    def handles(cls, spec: str | None) -> bool:
        """Whether this backend loads `spec` (None: the embedded default)."""

    @abstractmethod
    def load(self, spec: str | None, device: str | None, dtype: str, batch_size: int) -> LanguageModel:
        """The loaded model; UsageError when `spec` cannot be found or read. `dtype` "auto"
        asks the backend for what the hardware computes natively."""


def choose_backend(found: Registry, spec: str | None, backend_name: str | None = None,
                   model_args: str = "") -> ModelBackend:
    """The backend named `backend_name`, else the last registered one that handles `spec`
    (third-party backends come after the built-ins), made with `model_args` (key=value,...)."""
    if backend_name:
        if backend_name not in found.models:
            raise UsageError(f"unknown model backend '{backend_name}'; see `raghub models` "
                             f"(known: {', '.join(sorted(found.models))})")
        backend_class = found.models[backend_name]
    else:
        handling = [cls for cls in found.models.values() if cls.handles(spec)]
        if not handling:
            raise UsageError(f"no model backend loads {spec!r}; see `raghub models`")
        backend_class = handling[-1]
    return backend_class(**backend_class.parse_options(model_args, "--model-args", "model backend"))


def load_model(spec: str | None = None, device: str | None = None, dtype: str = "float32",
               batch_size: int = 8, backend: str | None = None, model_args: str = "") -> LanguageModel:
    """A model loaded by the registered backends, as `raghub run --model SPEC` loads it."""
    from raghub.plugin_manager import registry

    return choose_backend(registry(), spec, backend, model_args).load(spec, device, dtype, batch_size)
