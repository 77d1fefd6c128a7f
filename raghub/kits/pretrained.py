"""What the transformers model backends share (`hf-causal`, `gguf`, `hf-seq2seq`): loading a
hub id or a model folder, the content fingerprint of what was loaded, where the model runs (for
the record), and greedy generations cut at the end of text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from raghub.cache import files_fingerprint, fingerprint
from raghub.errors import UsageError
from raghub.kits import attention
from raghub.models import Generation, LanguageModel, ModelBackend
from raghub.options import Option

#: the files of a model folder that decide its outputs (weights, config, tokenizer)
CONTENT_FILES = ("*.safetensors", "*.bin", "*.json", "*.model", "*.txt", "*.jinja")
#: CPU flags of a native bfloat16 matrix product (AVX-512 BF16, AMX)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")
#: the backend options that `from_pretrained` takes
LOADER_OPTIONS = ("revision", "trust_remote_code", "attn_implementation")
#: the config keys in which transformers models state how many positions they take
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def native_dtype(device) -> str:
    """What `--dtype auto` runs: bfloat16 where the hardware computes it natively (a CUDA GPU
    that supports it, a CPU with AVX-512 BF16 or AMX), float32 elsewhere."""
    import torch

    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_flags() & BF16_CPU_FLAGS else "float32"


def folder_fingerprint(folder: Path) -> str:
    """A hash of a model folder's weight, config and tokenizer files, its subfolders' too (a
    sentence-transformers model keeps its pooling in `1_Pooling/`): `files_fingerprint`."""
    return files_fingerprint(sorted({path for pattern in CONTENT_FILES for path in folder.rglob(pattern)
                                     if path.is_file()}), folder)


def with_folder_contents(settings: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """`settings` with `<name>_content`, the folder's fingerprint, beside each of the `names` that
    names a local model folder, so that new files at the same path make a new key; a hub id or
    a model's name is left to say which weights it means."""
    contents = {f"{name}_content": folder_fingerprint(Path(settings[name]).expanduser()) for name in names
                if settings.get(name) and Path(settings[name]).expanduser().is_dir()}
    return {**settings, **contents}


def is_encoder_decoder_folder(spec: str | None) -> bool:
    """Whether `spec` is a model folder whose config.json says `is_encoder_decoder: true`
    (T5, BART, ...), read without importing transformers."""
    config = Path(spec).expanduser() / "config.json" if spec else None
    if config is None or not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("is_encoder_decoder") is True
    except (OSError, ValueError, AttributeError):
        return False


def use_cpu_attention(hf_model) -> None:
    """Switch a model in bfloat16 on a CPU to `attention.BLOCK_CAUSAL`, where its modelling
    code takes transformers' attention functions (it falls back to SDPA for all but plain
    causal self-attention, so results differ from SDPA's only by bfloat16 rounding)."""
    import torch

    if (hf_model.device.type == "cpu" and hf_model.dtype == torch.bfloat16
            and getattr(hf_model, "_supports_attention_backend", False)):
        hf_model.set_attn_implementation(attention.BLOCK_CAUSAL)


class PretrainedLM(LanguageModel):
    """A transformers model `hf_model` (a torch module, put in eval mode: what a backend that
    provides `weights` gives) and its tokenizer."""

    def __init__(self, hf_model, tokenizer, name: str, batch_size: int = 8, fingerprint: str = ""):
        super().__init__(tokenizer, name, batch_size, fingerprint)
        self.hf_model = hf_model.eval()

    @property
    def device(self):
        return self.hf_model.device

    @property
    def dtype(self) -> str:
        return str(self.hf_model.dtype).removeprefix("torch.")

    def stated_length(self) -> int | None:
        """The fewest tokens the config (its positions) and the tokenizer (`model_max_length`)
        say the model takes; None when neither says."""
        from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

        config = self.hf_model.config
        stated = [getattr(config, key) for key in POSITION_KEYS if isinstance(getattr(config, key, None), int)]
        if self.tokenizer.model_max_length < VERY_LARGE_INTEGER:  # transformers' "not stated"
            stated.append(self.tokenizer.model_max_length)
        return min(stated, default=None)

    def max_input_tokens(self, new_tokens: int = 0) -> int | None:
        """The stated length less `new_tokens`: a decoder's input and what follows share its positions."""
        length = self.stated_length()
        return None if length is None else length - new_tokens

    def load_trained_weights(self, folder: Path) -> None:
        """A LoRA adapter saved in `folder` is merged into the weights; a whole fine-tuned
        model there replaces them."""
        if (folder / "adapter_config.json").exists():
            from peft import PeftModel

            self.hf_model = PeftModel.from_pretrained(self.hf_model, str(folder)).merge_and_unload()
        else:
            base = self.hf_model
            self.hf_model = type(base).from_pretrained(str(folder), torch_dtype=base.dtype).to(base.device).eval()

    def hardware(self) -> dict[str, Any]:
        import os
        import platform

        import torch

        device = self.device
        return {**super().hardware(), "attention": self.hf_model.config._attn_implementation,
                "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or platform.machine()}

    def generations(self, new_tokens, scores: Sequence[Any]) -> list[Generation]:
        """`Generation`s from greedy output: `new_tokens` [B, T] the generated ids, `scores`
        the T per-step logits [B, V]; each row is cut at its first padding or end token."""
        import torch

        token_logprobs = torch.stack(list(scores), dim=1).float().log_softmax(-1)
        token_logprobs = token_logprobs.gather(-1, new_tokens[..., None])[..., 0]
        stop_ids = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        generations = []
        for row, tokens in enumerate(new_tokens.tolist()):
            length = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
            generations.append(Generation(text=self.decode(tokens[:length]),
                                          token_logprobs=token_logprobs[row, :length].tolist(),
                                          token_ids=tokens[:length]))
        return generations


class PretrainedBackend(ModelBackend):
    """Loads a transformers `auto_class` (e.g. AutoModelForCausalLM) from a hub id or a model
    folder, wrapped in `model_class`."""

    handles_description = "a hub id or a local model folder"
    options = {
        "revision": Option(str, None, "hub revision (branch, tag or commit)"),
        "trust_remote_code": Option(bool, False, "allow the checkpoint's own modelling code"),
        "attn_implementation": Option(str, None, "attention kernel, e.g. sdpa or eager (default: "
                                                 f"{attention.BLOCK_CAUSAL} on a CPU in bfloat16, else "
                                                 "the model's)"),
    }
    #: the transformers auto class that loads the weights
    auto_class: ClassVar[str] = ""
    #: the LanguageModel the loaded weights are wrapped in
    model_class: ClassVar[type[PretrainedLM]] = PretrainedLM

    def check(self, spec: str | None) -> None:
        """`spec` is a model folder (with a config.json) or, when no such path exists, has the
        form of a hub id."""
        if spec is None:
            raise UsageError(f"model backend '{self.name}' needs --model: a model folder or a hub id")
        path = Path(spec).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise UsageError(f"model folder {spec} has no config.json; give a model folder, "
                                 "a .gguf file or a hub id")
            return
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(spec)
        except HFValidationError:
            raise UsageError(f"model folder {spec} does not exist (and it is not a hub id); give a "
                             "model folder, a .gguf file or a hub id") from None

    def location(self, spec: str | None) -> tuple[str, str]:
        """(name for the record, what `from_pretrained` loads), for a `spec` that passed `check`."""
        path = Path(spec).expanduser()
        return spec, str(path) if path.exists() else spec

    @staticmethod
    def content_fingerprint(location: str, hf_model) -> str:
        """What identifies the loaded weights and tokenizer: the folder's files, or for a hub
        id the commit it resolved to."""
        if Path(location).is_dir():
            return folder_fingerprint(Path(location))
        return fingerprint(location, getattr(hf_model.config, "_commit_hash", None), hf_model.config.to_dict())

    def load(self, spec: str | None, device: str | None, dtype: str, batch_size: int) -> PretrainedLM:
        import torch
        import transformers

        self.check(spec)
        name, location = self.location(spec)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = native_dtype(device) if dtype == "auto" else dtype
        extra = {key: value for key, value in self.settings.items()
                 if key in LOADER_OPTIONS and value not in (None, False)}
        attention.register()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                location, **{k: v for k, v in extra.items() if k != "attn_implementation"})
            hf_model = getattr(transformers, self.auto_class).from_pretrained(
                location, dtype=getattr(torch, dtype), **extra).to(device)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UsageError(
                f"model {spec!r} cannot be loaded: not a local folder or .gguf file, and the "
                f"hub could not provide it ({first_line})"
            ) from error
        if "attn_implementation" not in extra:
            use_cpu_attention(hf_model)
        return self.wrap(hf_model, tokenizer, name, batch_size, self.content_fingerprint(location, hf_model))

    def wrap(self, hf_model, tokenizer, name: str, batch_size: int, fingerprint: str) -> PretrainedLM:
        """The loaded weights as this backend's `model_class`."""
        return self.model_class(hf_model, tokenizer, name, batch_size, fingerprint)
