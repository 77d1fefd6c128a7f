"""LoRA adapters for Parametric RAG: one per passage, trained from one seeded initial adapter,
summed at inference.

`AdapterBank` wraps the model with peft once (in place). It trains adapters either one passage
at a time with peft (`train_sequential`, the reference loop) or many passages at once
(`train_batched`): row i of a batch carries passage i's example and passes every target layer
as W x + (α/r) B_i A_i x, with the stacked A_i, B_i as the trainable tensors. The rows' losses
are independent and AdamW is elementwise, so the batched adapters equal the sequential ones up
to float rounding. `merged(states)` loads adapters and sums them with peft's
`add_weighted_adapter(weights 1, "cat")`: ΔW = Σ_i (α/r) B_i A_i.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

AdapterState = dict[str, torch.Tensor]  # peft state-dict keys (no adapter name) -> weights
ADAPTER_FILE = "adapter.safetensors"
INITIAL, TRAINING, MERGED = "initial_adapter", "training_adapter", "merged_adapter"


@dataclass(frozen=True)
class LoraSettings:
    """Everything that shapes one passage's adapter (dropout is 0: PRAG's setting, and what
    makes batched and sequential training agree)."""

    rank: int = 2
    alpha: float = 32.0
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    learning_rate: float = 3e-4
    epochs: int = 1
    seed: int = 42

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0,
                          target_modules=list(self.targets))


def token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean next-token cross-entropy over the row's real tokens (PRAG trains on
    the whole sequence, prompt included): logits [B, T, V], ids and mask [B, T] → [B]."""
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
    scored = mask[:, 1:].to(losses.dtype)
    return (losses * scored).sum(1) / scored.sum(1)


def save_adapter(state: AdapterState, folder: Path) -> None:
    save_file({key: value.contiguous() for key, value in state.items()}, str(folder / ADAPTER_FILE))


def load_adapter(folder: Path) -> AdapterState:
    return load_file(str(folder / ADAPTER_FILE))


class AdapterBank:
    """A model wrapped in place with peft, the seeded initial adapter, training and merging."""

    def __init__(self, hf_model: torch.nn.Module, settings: LoraSettings, pad_token_id: int = 0):
        self.settings = settings
        self.pad_token_id = pad_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.peft_model = get_peft_model(hf_model, settings.peft_config(), adapter_name=INITIAL)
        self.initial_state = self.state_of(INITIAL)
        self.peft_model.add_adapter(TRAINING, settings.peft_config())
        self.peft_model.set_adapter(INITIAL)
        #: peft key prefix of each adapted layer -> the layer (a peft LoRA module)
        self.lora_layers = {key.removesuffix(".lora_A.weight"): self.peft_model.get_submodule(
            key.removesuffix(".lora_A.weight")) for key in self.initial_state if key.endswith(".lora_A.weight")}

    @property
    def device(self) -> torch.device:
        return next(self.peft_model.parameters()).device

    def state_of(self, adapter_name: str) -> AdapterState:
        """A detached CPU copy of one adapter's weights."""
        state = get_peft_model_state_dict(self.peft_model, adapter_name=adapter_name)
        return {key: value.detach().cpu().clone() for key, value in state.items()}

    def unload(self) -> torch.nn.Module:
        """Remove every LoRA layer and give back the plain base model."""
        return self.peft_model.unload()

    def _padded(self, sequences: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    def train_sequential(self, examples_per_passage: Sequence[Sequence[list[int]]]) -> list[AdapterState]:
        """The reference loop: per passage, peft's adapter reset to the initial weights, a
        fresh AdamW, batch 1, `epochs` passes over its examples (token id lists)."""
        parameters = [p for name, p in self.peft_model.named_parameters() if f".{TRAINING}." in name]
        adapters = []
        self.peft_model.set_adapter(TRAINING)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                for examples in examples_per_passage:
                    set_peft_model_state_dict(self.peft_model, self.initial_state, adapter_name=TRAINING)
                    for parameter in parameters:
                        parameter.requires_grad_(True)
                    optimizer = torch.optim.AdamW(parameters, lr=self.settings.learning_rate)
                    for _epoch in range(self.settings.epochs):
                        for example in examples:
                            ids, mask = self._padded([example])
                            loss = token_losses(self.peft_model(input_ids=ids).logits, ids, mask).sum()
                            optimizer.zero_grad()
                            loss.backward()
                            optimizer.step()
                    adapters.append(self.state_of(TRAINING))
        finally:
            self.peft_model.set_adapter(INITIAL)
        return adapters

    def train_batched(self, examples_per_passage: Sequence[Sequence[list[int]]]) -> list[AdapterState]:
        """Every passage's adapter trained at once: step s feeds each passage's s-th example as
        one row of a batch, each row through its own low-rank delta. Every passage needs the
        same number of examples (so every adapter takes the same optimizer steps)."""
        if len({len(examples) for examples in examples_per_passage}) != 1:
            raise ValueError("batched training needs the same number of examples for every passage")
        count = len(examples_per_passage)
        stacked = {  # layer -> ([N, r, in] A, [N, out, r] B), all starting from the initial adapter
            prefix: tuple(self.initial_state[f"{prefix}.lora_{part}.weight"].to(self.device)
                          .expand(count, -1, -1).clone().requires_grad_(True) for part in "AB")
            for prefix in self.lora_layers}
        optimizer = torch.optim.AdamW([t for pair in stacked.values() for t in pair],
                                      lr=self.settings.learning_rate)
        scaling = self.settings.scaling

        def add_delta(a: torch.Tensor, b: torch.Tensor):
            def hook(_module, inputs, output):
                return output + torch.bmm(torch.bmm(inputs[0], a.transpose(1, 2)), b.transpose(1, 2)) * scaling
            return hook

        hooks = [self.lora_layers[prefix].register_forward_hook(add_delta(a, b))
                 for prefix, (a, b) in stacked.items()]
        try:
            with self.peft_model.disable_adapter(), torch.inference_mode(False), torch.enable_grad():
                for _epoch in range(self.settings.epochs):
                    for step in range(len(examples_per_passage[0])):
                        ids, mask = self._padded([examples[step] for examples in examples_per_passage])
                        logits = self.peft_model(input_ids=ids, attention_mask=mask).logits
                        loss = token_losses(logits, ids, mask).sum()
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
        finally:
            for hook in hooks:
                hook.remove()
        return [{f"{prefix}.lora_{part}.weight": tensor[row].detach().cpu().clone()
                 for prefix, pair in stacked.items() for part, tensor in zip("AB", pair)}
                for row in range(count)]

    @contextmanager
    def merged(self, adapters: Sequence[AdapterState]) -> Iterator[None]:
        """Inside the block the model runs with the adapters summed (no adapter when none)."""
        if not adapters:
            with self.peft_model.disable_adapter():
                yield
            return
        names = [f"passage{index}" for index in range(len(adapters))]
        for name, state in zip(names, adapters):
            self.peft_model.add_adapter(name, self.settings.peft_config())
            set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        self.peft_model.add_weighted_adapter(names, [1.0] * len(names), MERGED, combination_type="cat")
        self.peft_model.set_adapter(MERGED)
        try:
            yield
        finally:
            self.peft_model.set_adapter(INITIAL)
            for name in [*names, MERGED]:
                self.peft_model.delete_adapter(name)
