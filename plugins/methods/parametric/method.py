"""`parametric`: Parametric RAG (Su et al., 2025): retrieved passages become LoRA adapters.

As the reference code (oneal2000/PRAG) does it:

1. Self-augmentation: the model rewrites each passage (keeping its entities) and writes three
   question / answer / full-answer triples as JSON, sampled (temperature 0.7, top-k 50) and
   retried until they parse; passages that never parse are skipped (and counted).
2. Five training examples per passage, in the task's prompt format with the target
   "The answer is <answer>.": QA pairs 1-2 with the passage, the same with the rewrite, and QA
   pair 3 with no passage. The loss covers the whole sequence, as in PRAG.
3. One LoRA per passage (feed-forward projections, rank 2, alpha 32, AdamW, lr 3e-4, one epoch,
   batch 1), every passage starting from the same seeded initial adapter.
4. At inference the top-k passages' adapters are summed and the model answers greedily, with no
   passage in the prompt, or (`--combine`) with the same passages in the prompt too.

Augmentations and adapters are cached per passage, so a passage is trained once across
questions and runs, and an interrupted run resumes with the passages already trained.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from raghub import Method, Option, Passage, Question, Retrieved, UsageError

from .augmentation import AUGMENTATION_STYLES, Augmentation, AugmentationStyle, augment_passages, template_probe, training_texts

if TYPE_CHECKING:  # pragma: no cover
    from .training import AdapterBank, AdapterState


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


class Parametric(Method):
    name = "parametric"
    description = "Parametric RAG: each passage becomes a LoRA adapter; the top-k adapters are summed"
    needs_retrieval = True
    families = frozenset({"qa"})
    requires = frozenset({"weights", "sequence_logprobs"})  # LoRA training of a decoder-only model
    options = {
        "combine": Option(bool, False, "also put the passages in the prompt (PRAG's 'combine')"),
        "augmentation": Option(tuple(AUGMENTATION_STYLES), "prag",
                               "prag: PRAG's chat prompts asking for JSON; fewshot: plain completions "
                               "after a worked example, for models too small to write the JSON"),
        "lora_rank": Option(int, 2, "LoRA rank r of each passage's adapter", at_least=1),
        "lora_alpha": Option(float, 32.0, "LoRA alpha (the update is scaled by alpha / r)", above=0),
        "lora_targets": Option(str, "gate_proj,up_proj,down_proj", "comma-separated layer names the adapters modify"),
        "learning_rate": Option(float, 3e-4, "AdamW learning rate of adapter training", above=0),
        "epochs": Option(int, 1, "passes over each passage's five training examples (batch 1)", at_least=1),
        "seed": Option(int, 42, "seed of the initial adapter and of augmentation sampling"),
        "augment_retries": Option(int, 3, "extra attempts when the generated QA pairs do not parse", at_least=0),
        "augment_max_new_tokens": Option(int, 512, "token limit of each rewrite and QA generation",
                                         at_least=1),
        "augment_temperature": Option(float, 0.7, "sampling temperature of the augmentation; 0: greedy "
                                                  "(without retries, which would repeat the output)", at_least=0),
        "augment_top_k": Option(int, 50, "top-k sampling cut-off of the augmentation", at_least=1),
        "parallel_adapters": Option(int, None, "adapters trained together in one batched forward "
                                               "(1 = one passage at a time with peft); default 8 on "
                                               "a GPU, 1 on a CPU, where batching measured slower", at_least=1),
    }

    def __init__(self, model, cache, **options: Any) -> None:
        from .training import LoraSettings

        super().__init__(model, cache, **options)
        if self.settings["parallel_adapters"] is None:
            self.settings["parallel_adapters"] = 8 if self.model.device.type == "cuda" else 1
        self.lora = LoraSettings(
            rank=self.settings["lora_rank"], alpha=self.settings["lora_alpha"],
            targets=tuple(name.strip() for name in self.settings["lora_targets"].split(",") if name.strip()),
            learning_rate=self.settings["learning_rate"], epochs=self.settings["epochs"],
            seed=self.settings["seed"])
        self.console = Console(stderr=True)
        self._bank: AdapterBank | None = None
        self.unparseable: set[str] = set()

    @property
    def bank(self) -> AdapterBank:
        """The model wrapped with peft, made on first use."""
        if self._bank is None:
            from .training import AdapterBank

            try:
                self._bank = AdapterBank(self.model.hf_model, self.lora, self.model.tokenizer.pad_token_id)
            except ValueError as error:  # peft: a target layer name the model does not have
                raise UsageError(f"--lora-targets {self.settings['lora_targets']!r} do not fit "
                                 f"model {self.model.name}: {error}") from None
        return self._bank

    # ------------------------------------------------------------------ augmentation

    def _augmentation_key(self, passage: Passage) -> dict[str, Any]:
        settings = {key: self.settings[key] for key in
                    ("augmentation", "seed", "augment_retries", "augment_max_new_tokens", "augment_temperature", "augment_top_k")}
        style = self.style  # its prompts too, so a changed prompt augments afresh
        return {"passage": passage.as_text(), "model": self.model.name, "augmentation": settings,
                "prompts": [style.rewrite_prompt, *style.qa_requests("{passage}"), *style.stop]}

    @property
    def style(self) -> AugmentationStyle:
        return AUGMENTATION_STYLES[self.settings["augmentation"]]

    def sample(self, prompts: list[str], attempt: int) -> list[str]:
        """Continuations of `prompts`, sampled as PRAG does (seeded by `seed` and `attempt`) or
        greedy at temperature 0; chat replies when the augmentation style asks for them."""
        import torch

        style, tokenizer = self.style, self.model.tokenizer
        stopping = {"stop_strings": list(style.stop), "tokenizer": tokenizer} if style.stop else {}
        temperature = self.settings["augment_temperature"]
        decoding = ({"do_sample": True, "temperature": temperature, "top_k": self.settings["augment_top_k"],
                     "top_p": 1.0} if temperature > 0 else {"do_sample": False})
        tokenizer.padding_side = "left"
        replies = []
        with torch.random.fork_rng(devices=[]), self.bank.merged([]), torch.inference_mode():
            torch.manual_seed(self.settings["seed"] + attempt)
            for first in range(0, len(prompts), self.model.batch_size):
                batch = prompts[first : first + self.model.batch_size]
                if style.chat:
                    batch = [self.model.chat_prompt(prompt) for prompt in batch]
                inputs = tokenizer(batch, return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.model.device)
                output = self.model.hf_model.generate(
                    **inputs, **decoding, max_new_tokens=self.settings["augment_max_new_tokens"],
                    pad_token_id=tokenizer.pad_token_id, **stopping)
                replies += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return replies

    def augmentations(self, passages: Sequence[Passage]) -> list[Augmentation]:
        """Each passage's augmentation, from the cache or generated (missing ones in batches)."""
        kind = "parametric-augmentation"
        keys = {p.id: self._augmentation_key(p) for p in passages}
        missing = [p for p in passages if not self.cache.is_valid(self.cache.entry_path(kind, keys[p.id]))]
        fresh: dict[str, Augmentation] = {}
        # greedy decoding would only repeat an output that did not parse
        retries = self.settings["augment_retries"] if self.settings["augment_temperature"] > 0 else 0
        if missing:
            with _progress(self.console) as progress:
                bar = progress.add_task("parametric: self-augmenting passages", total=len(missing))
                for first in range(0, len(missing), self.model.batch_size):
                    chunk = missing[first : first + self.model.batch_size]
                    made = augment_passages([p.as_text() for p in chunk], self.sample, retries, self.style)
                    fresh.update({p.id: a for p, a in zip(chunk, made)})
                    progress.advance(bar, len(chunk))
            self.counters["passages_augmented"] += len(missing)
        return [Augmentation.from_json(self.cache.json(kind, keys[p.id], lambda p=p: fresh[p.id].to_json()))
                for p in passages]

    # ------------------------------------------------------------------ adapters

    def _adapter_key(self, passage: Passage, augmentation: Augmentation, question: Question) -> dict[str, Any]:
        return {"passage": passage.as_text(), "model": self.model.name, "template": template_probe(question),
                "augmentation": augmentation.to_json(), "lora": asdict(self.lora)}

    def _token_ids(self, prompt: str, target: str) -> list[int]:
        separator = "" if prompt[-1:].isspace() else " "
        return self.model.encode(prompt) + self.model.encode(separator + target)

    def _train(self, examples_per_passage: list[list[list[int]]]) -> list[AdapterState]:
        if self.settings["parallel_adapters"] == 1:
            return self.bank.train_sequential(examples_per_passage)
        return self.bank.train_batched(examples_per_passage)

    def adapters(self, passages: Sequence[Passage], question: Question) -> dict[str, AdapterState]:
        """Adapters of the passages whose augmentation parsed, by passage id: from the cache, or
        trained `parallel_adapters` at a time (similar lengths together) and cached one by one."""
        from .training import load_adapter, save_adapter

        augmented = list(zip(passages, self.augmentations(passages)))
        usable = [(p, a) for p, a in augmented if a.qa_pairs]
        newly_unparseable = {p.id for p, a in augmented if not a.qa_pairs} - self.unparseable
        self.unparseable |= newly_unparseable
        self.counters["passages_unparseable"] += len(newly_unparseable)
        kind = "parametric-adapter"
        keys = {p.id: self._adapter_key(p, a, question) for p, a in usable}
        examples = {p.id: [self._token_ids(*text) for text in training_texts(question, p, a)]
                    for p, a in usable if not self.cache.is_valid(self.cache.entry_path(kind, keys[p.id]))}
        adapters: dict[str, AdapterState] = {}
        if examples:
            order = sorted(examples, key=lambda pid: sum(map(len, examples[pid])))
            size = self.settings["parallel_adapters"]
            with _progress(self.console) as progress:
                bar = progress.add_task("parametric: training passage adapters", total=len(order))
                for first in range(0, len(order), size):
                    chunk = order[first : first + size]
                    for pid, state in zip(chunk, self._train([examples[pid] for pid in chunk])):
                        adapters[pid] = self.cache.get_or_build(
                            kind, keys[pid], lambda folder, state=state: save_adapter(state, folder), load_adapter)
                    progress.advance(bar, len(chunk))
            self.counters["adapters_trained"] += len(examples)
        for pid in keys.keys() - adapters.keys():  # found valid in the cache above
            adapters[pid] = load_adapter(self.cache.entry_path(kind, keys[pid]))
            self.counters["adapters_from_cache"] += 1
        return adapters

    # ------------------------------------------------------------------ answering

    def answer(self, questions: Sequence[Question], retrieved: Sequence[Sequence[Retrieved]]) -> list[str]:
        """Greedy answers with the retrieved passages' adapters summed (a passage whose
        augmentation never parsed has no adapter); with --combine every retrieved passage is
        in the prompt too, as in PRAG's combine."""
        if not questions:
            return []
        passages = list({r.passage.id: r.passage for docs in retrieved for r in docs}.values())
        adapters = self.adapters(passages, questions[0])
        answers = []
        for question, docs in zip(questions, retrieved):
            prompt = question.prompt([r.passage for r in docs] if self.settings["combine"] else [])
            with self.bank.merged([adapters[r.passage.id] for r in docs if r.passage.id in adapters]):
                generation = self.model.generate([prompt], question.max_new_tokens)[0]
            answers.append(question.answer_from(generation.text))
        return answers

    def run_stats(self) -> dict[str, Any]:
        return {key: self.counters[key] for key in
                ("passages_augmented", "adapters_trained", "adapters_from_cache", "passages_unparseable")}

    def close(self) -> None:
        """Take the LoRA layers out of the shared model again."""
        if self._bank is not None:
            self._bank.unload()
            self._bank = None
