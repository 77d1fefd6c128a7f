"""The model interface every method shares, and the backend plugins that load models.

A `ModelBackend` (registered through `register_models`) turns a `--model` spec (a hub id, a
folder, a file, or None for the embedded default) into a `LanguageModel`. Methods use only the
`LanguageModel` interface: tokenising, scoring token log-probs after a prefix, generating.

What a backend's models can do beyond tokenising is declared as capabilities
(`ModelBackend.provides`, names in `CAPABILITIES`); task families, methods and the trainer
declare what they require, and the pair is checked before the model loads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from raghub.cache import path_fingerprint
from raghub.distributed import notice
from raghub.errors import UsageError
from raghub.interfaces import PASSAGES_DROPPED, Plugin, Registry


#: capability name -> what a model that provides it offers
CAPABILITIES = {
    "generate": "greedy generation (`generate`, `generate_line`)",
    "sequence_logprobs": "ln p of each token of a text after the tokens before it (`sequence_logprobs`): "
                         "a decoder-only model",
    "continuation_logprobs": "ln p of a continuation given a prompt (`continuation_logprobs`)",
    "encoder_states": "an encoder-decoder's encoder outputs and decoding from them (`encoder_states`, "
                      "`generate_from_states`)",
    "answer_scores": "answer log-probs with gradients, for training (`answer_scores`)",
    "weights": "the transformers model itself in this process (`hf_model`), to train, merge an adapter into "
               "or run step by step",
}
#: what a backend that declares nothing provides: the abstract `LanguageModel` interface
BASE_CAPABILITIES = frozenset({"generate", "sequence_logprobs", "continuation_logprobs"})


@dataclass(frozen=True)
class ModelSpec:
    """What loads a model, as `raghub run` takes it; a loaded model keeps its own
    (`LanguageModel.loaded_from`), so another process can load the same model."""

    model: str | None = None
    backend: str | None = None
    model_args: str = ""
    dtype: str = "auto"

    def flags(self) -> list[str]:
        """The spec as `--model`, `--model-backend`, `--model-args` and `--dtype` flags."""
        given = {"--model": self.model, "--model-backend": self.backend, "--model-args": self.model_args}
        return [part for flag, value in given.items() if value for part in (flag, value)] + ["--dtype", self.dtype]


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

    #: the spec it was loaded from (set by `ModelBackend.load_from_spec`); None when made directly
    loaded_from: ModelSpec | None = None

    def __init__(self, tokenizer: Any, name: str, batch_size: int = 8, fingerprint: str = ""):
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.fingerprint = fingerprint or name
        #: the counts of the run using the model (the runner shares its method's `counters`)
        self.counters: Counter[str] = Counter()
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

    def max_input_tokens(self, new_tokens: int = 0) -> int | None:
        """The most tokens (as `encode` counts them) an input may have and leave room for
        `new_tokens` more (generated after it, or scored in the same sequence); None when the
        model states no limit (the default)."""
        return None

    def drop_passages(self, count: int, why: str) -> None:
        """Counts `count` retrieved passages left out of an input too long for the model in the
        run's `PASSAGES_DROPPED`, saying `why` on stderr the first time in the run."""
        if not count:
            return
        if not self.counters[PASSAGES_DROPPED]:
            notice(f"{why}: the lowest-ranked passages are left out of each input too long for the "
                   f"model (the record's method_stats counts them as {PASSAGES_DROPPED})")
        self.counters[PASSAGES_DROPPED] += count

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

    def load_trained_weights(self, folder: Path) -> None:
        """Put the generator `raghub train` saved in `folder` into this model's weights: what a
        model that provides `weights` can do; others say so."""
        raise UsageError(f"model {self.name!r} cannot load trained weights: its backend does not provide weights")

    def hardware(self) -> dict[str, Any]:
        """Where the model runs, for the record."""
        return {"device": str(self.device), "dtype": self.dtype}


class ModelBackend(Plugin, ABC):
    """Loads models of one kind. The runner asks the backends, third-party ones first, which
    `handles` the `--model` spec (or uses `--model-backend NAME`); `options` are the keys
    `--model-args key=value,...` accepts."""

    #: one line for `raghub models`: which specs this backend loads
    handles_description: ClassVar[str] = ""
    #: the capabilities (`CAPABILITIES`) its models have; a backend that declares none has the
    #: abstract `LanguageModel` interface's
    provides: ClassVar[frozenset[str]] = BASE_CAPABILITIES

    def __init__(self, **options: Any) -> None:
        self.settings = self.resolve_options(options)

    @classmethod
    @abstractmethod
    def handles(cls, spec: str | None) -> bool:
        """Whether this backend loads `spec` (None: the embedded default)."""

    def check(self, spec: str | None) -> None:
        """A UsageError when `spec` can be seen not to load without loading it (a named file or
        folder that is not there); the runner calls it before any model loads."""

    def content_identity(self, spec: str | None) -> str | None:
        """What identifies the weights `spec` names before they load: a local file's or folder's
        content, so that new weights at the same path are a new run; None where only loading can
        tell (a hub id, a server), the loaded model's fingerprint then naming them."""
        path = Path(spec).expanduser() if spec else None
        return path_fingerprint(path) if path is not None and path.exists() else None

    @abstractmethod
    def load(self, spec: str | None, device: str | None, dtype: str, batch_size: int) -> LanguageModel:
        """The loaded model; UsageError when `spec` cannot be found or read. `dtype` "auto"
        asks the backend for what the hardware computes natively."""

    def load_from_spec(self, spec: ModelSpec, device: str | None, batch_size: int) -> LanguageModel:
        """`load` of `spec`, the model keeping the spec (with this backend's name) as `loaded_from`."""
        model = self.load(spec.model, device, spec.dtype, batch_size)
        model.loaded_from = ModelSpec(spec.model, self.name, spec.model_args, spec.dtype)
        return model

    def check_provides(self, required: Iterable[str], needed_by: str) -> None:
        """UsageError in one line when its models lack a capability that `needed_by` requires."""
        missing = sorted(set(required) - self.provides)
        if missing:
            needs = "; ".join(f"{name} ({CAPABILITIES[name]})" if name in CAPABILITIES else name for name in missing)
            raise UsageError(f"{needed_by} needs a model that provides {needs}; model backend '{self.name}' "
                             f"provides only {', '.join(sorted(self.provides)) or 'nothing'}")


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
    """A model loaded by the default plugin host's backends, as `raghub run --model SPEC` loads
    it (for scripts and tests; the runner loads through its own host's)."""
    from raghub.plugin_manager import default_host

    return choose_backend(default_host().registry, spec, backend, model_args).load_from_spec(
        ModelSpec(spec, backend, model_args, dtype), device, batch_size)
