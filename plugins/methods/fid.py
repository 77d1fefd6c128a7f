"""`fid`: Fusion-in-Decoder (Izacard & Grave, 2021): each (question, passage) pair is encoded on
its own, the encoder outputs of a question's K pairs are concatenated along the sequence axis,
and the decoder reads all of them in one greedy pass. It requires an encoder-decoder model
(`encoder_states`: `hf-seq2seq`); `--checkpoint DIR` evaluates a generator `raghub train`
trained (the runner loads it into the model)."""

from __future__ import annotations

from raghub import CHECKPOINT_OPTION, Method, hookimpl


class FusionInDecoder(Method):
    name = "fid"
    description = "Fusion-in-Decoder: passages encoded apart, decoded together (encoder-decoder models)"
    needs_retrieval = True
    families = frozenset({"qa"})
    requires = frozenset({"encoder_states"})
    options = {"checkpoint": CHECKPOINT_OPTION}

    def __init__(self, model, cache, **options):
        super().__init__(model, cache, **options)

    def fused_states(self, prompt_lists):
        """For each question, its prompts' encoder states (padding dropped) concatenated along
        the sequence axis, right-padded across questions: ([Q, L, d], mask [Q, L])."""
        import torch

        prompts = [prompt for prompt_list in prompt_lists for prompt in prompt_list]
        encoded = []  # each prompt's states, [length, d]
        for first in range(0, len(prompts), self.model.batch_size):
            states, mask = self.model.encoder_states(prompts[first : first + self.model.batch_size])
            encoded += [row[keep.bool()] for row, keep in zip(states, mask)]
        pairs = iter(encoded)
        fused = [torch.cat([next(pairs) for _ in prompt_list]) for prompt_list in prompt_lists]
        lengths = torch.tensor([len(states) for states in fused])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long().to(fused[0].device)
        return torch.nn.utils.rnn.pad_sequence(fused, batch_first=True), mask

    def answer(self, questions, retrieved):
        """One greedy decoder pass per batch of questions over each question's fused passages
        (a question with no passages: its prompt alone)."""
        prompt_lists = [[q.prompt([r.passage]) for r in docs] or [q.prompt([])]
                        for q, docs in zip(questions, retrieved)]
        states, mask = self.fused_states(prompt_lists)
        generations = self.model.generate_from_states(states, mask, max(q.max_new_tokens for q in questions))
        return [q.extract(g.text) for q, g in zip(questions, generations)]


@hookimpl
def register_methods(register):
    register(FusionInDecoder)
