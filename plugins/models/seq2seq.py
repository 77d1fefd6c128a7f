"""`hf-seq2seq`: any transformers AutoModelForSeq2SeqLM (T5, BART, ...), from a folder whose
config.json says `is_encoder_decoder: true`, or from a hub id with `--model-backend hf-seq2seq`.

The prompt is the encoder's input and the answer the decoder's output: `continuation_logprobs`
scores an answer given a prompt and `generate` decodes greedily, so the QA methods run
unchanged. An encoder-decoder model does not score text token by token: the backend does not
provide `sequence_logprobs`, so the runner refuses it for language-modelling tasks before loading.
"""

from __future__ import annotations

from typing import Any, Sequence

from raghub import AnswerScores, Generation, ModelProgress, UsageError, hookimpl
from raghub.kits.pretrained import PretrainedBackend, PretrainedLM, is_encoder_decoder_folder


class Seq2SeqLM(PretrainedLM):
    """An encoder-decoder model. Besides the `LanguageModel` interface, methods that combine
    encoder outputs themselves (Fusion-in-Decoder) use `encoder_states` and
    `generate_from_states`;
    `hf_model` is the transformers model. A task's prompts are fitted to the tokenizer's limit
    (`max_input_tokens`); any other prompt longer than it loses its beginning, so the question
    at its end is kept."""

    def __init__(self, hf_model, tokenizer, name: str, batch_size: int = 8, fingerprint: str = ""):
        super().__init__(hf_model, tokenizer, name, batch_size, fingerprint)
        self.tokenizer.truncation_side = "left"

    def chat_prompt(self, user_message: str) -> str:
        """The message in the chat template, or as it is when the tokenizer has none (T5 and
        BART have none)."""
        return super().chat_prompt(user_message) if self.tokenizer.chat_template else user_message

    def max_input_tokens(self, new_tokens: int = 0) -> int | None:
        """The encoder's stated length less its special tokens; the decoder's output (the
        `new_tokens`) has positions of its own."""
        length = self.stated_length()
        return None if length is None else length - self.tokenizer.num_special_tokens_to_add()

    def sequence_logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Any]:
        raise UsageError(f"model {self.name!r} is an encoder-decoder model: it scores an answer "
                         "given a prompt, not text token by token")

    def encoder_inputs(self, prompts: Sequence[str]):
        """The prompts tokenised for the encoder (with the model's special tokens), padded."""
        return self.tokenizer(list(prompts), return_tensors="pt", padding=True,
                              truncation=True).to(self.device)

    def _answer_logprobs(self, prompts: Sequence[str], answer_ids: Sequence[Sequence[int]]):
        """One forward pass, with gradients: (log-probs over the vocabulary at each answer
        position [B, T, V], each answer token's ln p [B, T], zero past its length)."""
        import torch

        labels = torch.full((len(answer_ids), max(map(len, answer_ids))), -100, dtype=torch.long)
        for row, ids in enumerate(answer_ids):
            labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels = labels.to(self.device)
        logprobs = self.hf_model(**self.encoder_inputs(prompts), labels=labels).logits.float().log_softmax(-1)
        return logprobs, logprobs.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != -100)

    def answer_scores(self, prompts: Sequence[str], answers: Sequence[str]) -> AnswerScores:
        """Each answer and the end token, decoded after its prompt as the encoder input."""
        targets = [self.encode(answer) + [self.tokenizer.eos_token_id] for answer in answers]
        logprobs, token_logprobs = self._answer_logprobs(prompts, targets)
        return AnswerScores(token_logprobs, [row[: len(t)] for row, t in zip(logprobs, targets)], targets,
                            [self.tokenizer.eos_token_id])

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Any]:
        """ln p of each continuation's tokens given its prompt as the encoder input."""
        import torch

        results = []
        progress = ModelProgress(len(prompts))
        for first in range(0, len(prompts), self.batch_size):
            batch = slice(first, first + self.batch_size)
            answer_ids = [self.encode(text) for text in continuations[batch]]
            with torch.inference_mode():
                scored = self._answer_logprobs(prompts[batch], answer_ids)[1]
            results += [row[: len(ids)].cpu() for row, ids in zip(scored, answer_ids)]
            progress.advance(len(answer_ids))
        return results

    def encoder_states(self, prompts: Sequence[str]):
        """The encoder's last hidden states of the prompts and their attention mask:
        ([B, L, d], [B, L])."""
        import torch

        inputs = self.encoder_inputs(prompts)
        with torch.inference_mode():
            states = self.hf_model.get_encoder()(**inputs).last_hidden_state
        return states, inputs["attention_mask"]

    def generate_from_states(self, states, attention_mask, max_new_tokens: int) -> list[Generation]:
        """Greedy decoding over given encoder states [B, L, d] (masked by [B, L])."""
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        with torch.inference_mode():
            output = self.hf_model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=attention_mask,
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                output_scores=True, return_dict_in_generate=True,
            )
        return self.generations(output.sequences[:, 1:], output.scores)  # after the start token

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy answers to `prompts`, `batch_size` prompts per encoder and decoder pass, each
        pass reported to the run's progress bar (`ModelProgress`)."""
        generations: list[Generation] = []
        progress = ModelProgress(len(prompts))
        for first in range(0, len(prompts), self.batch_size):
            states, mask = self.encoder_states(prompts[first : first + self.batch_size])
            generations += self.generate_from_states(states, mask, max_new_tokens)
            progress.advance(len(mask))
        return generations


class HuggingFaceSeq2Seq(PretrainedBackend):
    name = "hf-seq2seq"
    description = "a transformers AutoModelForSeq2SeqLM (T5, BART, ...)"
    handles_description = ("a folder whose config.json says is_encoder_decoder; a hub id with "
                           "--model-backend hf-seq2seq")
    auto_class = "AutoModelForSeq2SeqLM"
    model_class = Seq2SeqLM
    provides = frozenset({"generate", "continuation_logprobs", "encoder_states", "answer_scores", "weights"})

    @classmethod
    def handles(cls, spec: str | None) -> bool:
        return is_encoder_decoder_folder(spec)


@hookimpl
def register_models(register):
    register(HuggingFaceSeq2Seq)
