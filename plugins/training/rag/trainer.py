"""The training loop of `raghub train`: a retriever's query encoder (and optionally its passage
encoder) and a generator (a LoRA adapter, or every weight with `lora_rank` 0), trained on a QA
task's questions through an objective. The retriever is any whose encoders are trainable
(`EmbeddingRetriever.trainable_encoders`: `dense`, `dpr`); the generator any model backend that
provides `answer_scores` and `weights` (causal LMs and encoder-decoders), checked before loading.

Per step, for each question of the global batch: the query encoder embeds it (with gradients);
the top-K passages are found against the passage embeddings (frozen: query-side training, no
stale index; or, with `train_passages`, the K found re-encoded by a trainable passage encoder,
and the whole index rebuilt every `refresh_every` steps); the scores s_k = q·p_k and the
generator's answer-token log-probs under each f(x, z_k) (the task's prompt with passage k; the
loss covers the answer's tokens only) go to the objective. `alternate N` trains the retriever
alone for N steps (generator frozen), then the generator alone for N, and so on. A step
accumulates `grad_accum` batches before the optimizers step; their learning rates warm up
linearly over `warmup_steps`, then stay constant.

Under torchrun (WORLD_SIZE > 1) each process takes its share of the global batch and
DistributedDataParallel (gloo) averages the gradients, so the losses match a single process's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from raghub import (Cache, GENERATOR, MANIFEST, Question, RunError, TRAINER_STATE, TRAIN_LOG, UsageError,
                    answered_questions, barrier, cache_root, choose_backend, load_trained_generator, mean_over_ranks,
                    question_task, ranks, read_checkpoint, task_corpus, write_checkpoint)

from .config import TrainConfig
from .penalties import keyword_mass, length_penalty, repetition_unlikelihood


def keep_log_until(log: Path, step: int) -> None:
    """Keep the training log's lines up to `step` (later ones were computed after the last save and
    are repeated now); a last line torn by a kill mid-write is dropped with them."""
    if not log.exists():
        return
    lines = log.read_text(encoding="utf-8").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UsageError(f"{log}, line {number}: not JSON; remove the line to resume") from None
        if entry["step"] <= step:
            kept.append(line)
    log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class RagModel(torch.nn.Module):
    """The retriever's trainable encoders and the generator, and one batch's loss."""

    def __init__(self, encoders: Any, lm: Any, passages: list, passage_matrix: torch.Tensor, objective: Any,
                 config: TrainConfig):
        super().__init__()
        self.encoders = encoders
        self.query_encoder = encoders.query_module
        self.passage_encoder = encoders.passage_module
        self.generator = lm.hf_model
        self.lm = lm
        self.passages = passages
        self.passage_matrix = passage_matrix
        self.objective = objective
        self.config = config
        self.penalties = config.penalty_weights()

    def retrieve(self, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-K passage positions [B, K], their scores q·p [B, K])."""
        queries = self.encoders.embed_queries([q.query for q in questions]).float()
        top = (queries.detach() @ self.passage_matrix.T).topk(self.config.n_docs, dim=-1).indices
        if self.passage_encoder is None:
            found = self.passage_matrix[top]
        else:
            found = self.encoders.embed_passages([self.passages[i] for i in top.flatten().tolist()]).float()
            found = found.view(*top.shape, -1)
        return top, (queries[:, None, :] * found).sum(-1)

    def answer_scores(self, questions: Sequence[Question], top: torch.Tensor):
        """The generator's scores of each question's first answer under each of its passages'
        prompts (rows question by question, K per question)."""
        prompts = [q.prompt([self.passages[position]]) for q, row in zip(questions, top.tolist()) for position in row]
        answers = [q.answers[0] for q in questions for _ in range(top.shape[1])]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16"):
            return self.lm.answer_scores(prompts, answers)

    def penalty_terms(self, questions: Sequence[Question], scored: Any) -> dict[str, torch.Tensor]:
        """Each weighted penalty, averaged over the (question, passage) rows."""
        terms: dict[str, list[torch.Tensor]] = {name: [] for name in self.penalties}
        for row, (own, target) in enumerate(zip(scored.position_logprobs, scored.targets)):
            question = questions[row // self.config.n_docs]
            if "repetition" in terms:
                terms["repetition"].append(repetition_unlikelihood(own, target, self.config.repetition_ngram))
            if "keyword" in terms:
                keywords = {t for word in question.question.split() if len(word) >= 4
                            for t in self.lm.encode(" " + word.strip("?,.!"))} - set(target)
                terms["keyword"].append(keyword_mass(own, sorted(keywords)))
            if "length" in terms:
                terms["length"].append(length_penalty(own, scored.stop_ids))
        return {name: torch.stack(values).mean() for name, values in terms.items()}

    def forward(self, questions: Sequence[Question], phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This process's share of a batch's loss (the mean over its questions) and its parts.
        `phase` is "joint", "retriever" (generator frozen) or "generator" (retriever frozen)."""
        with torch.set_grad_enabled(phase != "generator"):
            top, scores = self.retrieve(questions)
        with torch.set_grad_enabled(phase != "retriever"):
            scored = self.answer_scores(questions, top)
        loss = self.objective.loss(scores, scored.token_logprobs.view(*top.shape, -1)).mean()
        parts = {"objective": loss.detach()}
        if phase != "retriever" and self.penalties:
            for name, value in self.penalty_terms(questions, scored).items():
                loss = loss + self.penalties[name] * value
                parts[name] = value.detach()
        return loss, parts

    @torch.no_grad()
    def refresh_index(self) -> None:
        """Re-embed every passage with the current passage encoder."""
        self.passage_matrix = torch.cat([self.encoders.embed_passages(self.passages[i : i + 64]).float()
                                         for i in range(0, len(self.passages), 64)])


class Trainer:
    """Builds the models from a `TrainConfig`, resumes from the output folder's last save,
    trains, logs and saves."""

    #: what it needs of the generator: answer scores with gradients, and the weights themselves
    #: (`hf_model`), which it wraps in a LoRA adapter or trains in full
    requires = frozenset({"answer_scores", "weights"})

    def __init__(self, config: TrainConfig, found: Any):
        self.config = config
        self.ranks = ranks(backend="gloo")  # training runs on the CPU, even beside a GPU
        if config.batch_size % self.ranks.world_size:
            raise UsageError(f"--batch-size {config.batch_size} must be a multiple of the {self.ranks.world_size} processes")
        self.task = question_task(config.task, found, config.data_dir, config.limit, "train")
        backend = choose_backend(found, config.model)
        backend.check_provides(self.requires, "raghub train")
        self.objective = self._objective(found)
        if config.retriever not in found.retrievers:
            raise UsageError(f"unknown retriever '{config.retriever}'; see `raghub retrievers`")
        self.output = Path(config.output)
        self.resumed = read_checkpoint(self.output, "--output") if (self.output / MANIFEST).exists() else None
        if self.resumed and self.resumed.manifest["fingerprint"] != config.fingerprint():
            raise UsageError(f"--output {self.output} holds a checkpoint of another training configuration; "
                             "give another --output (or the same settings to resume)")
        retriever_class = found.retrievers[config.retriever]
        if not hasattr(retriever_class, "trainable_encoders"):
            raise UsageError(f"retriever '{config.retriever}' has no trainable encoders; use dense or dpr")
        unknown = sorted(config.retriever_settings().keys() - retriever_class.options.keys())
        if unknown:
            raise UsageError(f"--{unknown[0].replace('_', '-')}: retriever '{config.retriever}' has no such option")
        self.retriever = retriever_class(Cache(cache_root()), **config.retriever_settings(),
                                         **({"checkpoint": str(self.output)} if self.resumed else {}))
        self.lm = backend.load(config.model, "cpu", "float32", config.batch_size)
        self.questions = answered_questions(self.task.examples(self.lm, config.limit))
        passages, self.corpus_label, corpus = task_corpus(self.task)
        encoders = self.retriever.trainable_encoders(config.train_passages)
        matrix = torch.from_numpy(np.array(self.retriever.passage_embeddings(passages, corpus), dtype=np.float32))
        self._prepare_generator()
        for module in (encoders.query_module, encoders.passage_module):
            if module is not None:
                module.eval()  # no dropout: steps are deterministic, so a resumed run repeats them exactly
        self.model = RagModel(encoders, self.lm, passages, matrix, self.objective, config)
        if encoders.passage_module is not None and self.resumed:
            self.model.refresh_index()
        self.optimizers = self._optimizers()
        self.schedules = {name: torch.optim.lr_scheduler.LambdaLR(optimizer, self.warmup)
                          for name, optimizer in self.optimizers.items()}
        self.step = self.resumed.manifest["step"] if self.resumed else 0
        if self.resumed:
            states = torch.load(self.resumed.part(TRAINER_STATE), weights_only=True)
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(states[name])
                self.schedules[name].load_state_dict(states[f"{name}-schedule"])
        self.ddp = self.model
        if self.ranks.world_size > 1:
            # unused: an encoder's pooler, and the frozen side in an alternating phase
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)

    def _objective(self, found: Any) -> Any:
        """The `--objective` with its `--objective-args`."""
        config = self.config
        if config.objective not in found.objectives:
            raise UsageError(f"unknown objective '{config.objective}' (known: {', '.join(sorted(found.objectives))})")
        objective_class = found.objectives[config.objective]
        return objective_class(**objective_class.parse_options(config.objective_args, "--objective-args", "objective"))

    def _prepare_generator(self) -> None:
        """Freeze the generator, then make trainable what the objective trains: a LoRA
        adapter, or every weight with `lora_rank` 0; resumed from the last save."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        config = self.config
        if self.resumed and self.objective.trains_generator and not config.lora_rank:
            load_trained_generator(self.lm, self.resumed, "--output")
        for parameter in self.lm.hf_model.parameters():
            parameter.requires_grad_(self.objective.trains_generator and not config.lora_rank)
        if self.objective.trains_generator and config.lora_rank:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                try:
                    self.lm.hf_model = get_peft_model(self.lm.hf_model, LoraConfig(
                        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                        target_modules=[t.strip() for t in config.lora_targets.split(",") if t.strip()]))
                except ValueError as error:
                    raise UsageError(f"--lora-targets {config.lora_targets}: {str(error).splitlines()[0]}") from None
            if self.resumed:
                adapter = self.resumed.part(GENERATOR) / "adapter_model.safetensors"
                set_peft_model_state_dict(self.lm.hf_model, load_file(str(adapter)))
        self.lm.hf_model.train(False)  # no dropout, as for the encoders

    def warmup(self, finished_steps: int) -> float:
        """The learning-rate factor after `finished_steps` optimizer steps: linear warm-up."""
        return min(1.0, (finished_steps + 1) / self.config.warmup_steps) if self.config.warmup_steps else 1.0

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW for the retriever's encoders, one for the generator's trainable weights
        (stepped only in their own phases)."""
        retriever = [p for module in (self.model.query_encoder, self.model.passage_encoder) if module is not None
                     for p in module.parameters()]
        optimizers = {"retriever": torch.optim.AdamW(retriever, lr=self.config.retriever_learning_rate)}
        if self.objective.trains_generator:
            trained = [p for p in self.model.generator.parameters() if p.requires_grad]
            optimizers["generator"] = torch.optim.AdamW(trained, lr=self.config.learning_rate)
        return optimizers

    def phase(self, step: int) -> str:
        """Which side trains at `step` (1-based)."""
        if not self.objective.trains_generator:
            return "retriever"
        if not self.config.alternate:
            return "joint"
        return "retriever" if (step - 1) // self.config.alternate % 2 == 0 else "generator"

    def batch(self, step: int, part: int = 0) -> list[Question]:
        """This process's share of batch `part` (of `grad_accum`) of step `step`: consecutive
        questions of a seeded shuffle, reshuffled every epoch."""
        size, count = self.config.batch_size, len(self.questions)
        share = size // self.ranks.world_size
        first = ((step - 1) * self.config.grad_accum + part) * size + self.ranks.rank * share
        chosen = []
        for position in range(first, first + share):
            epoch, index = divmod(position, count)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed + epoch))
            chosen.append(self.questions[int(order[index])])
        return chosen

    def manifest(self) -> dict[str, Any]:
        definition = self.task.config
        return {
            "config": asdict(self.config), "fingerprint": self.config.fingerprint(),
            "objective": self.config.objective, "model": self.lm.name, "model_fingerprint": self.lm.fingerprint,
            "retriever": self.config.retriever, "retriever_settings": self.retriever.encoder_settings(),
            "encoder": self.retriever.settings["encoder"], "world_size": self.ranks.world_size,
            "trained_on": {"task": self.task.name, "source": definition.get("source"),
                           "articles": definition.get("articles"), "questions": len(self.questions),
                           "corpus": self.corpus_label},
        }

    def save(self) -> None:
        def parts(folder: Path) -> None:
            if self.objective.trains_generator:
                self.model.generator.save_pretrained(str(folder / GENERATOR))
                if not self.config.lora_rank:
                    self.lm.tokenizer.save_pretrained(str(folder / GENERATOR))
            self.model.encoders.save(folder)
            states = {name: o.state_dict() for name, o in self.optimizers.items()}
            states.update({f"{name}-schedule": s.state_dict() for name, s in self.schedules.items()})
            torch.save(states, folder / TRAINER_STATE)

        if self.ranks.is_main:
            write_checkpoint(self.output, self.step, self.manifest(), parts)
        barrier()

    def run_step(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over `grad_accum` batches; returns the mean loss and parts."""
        phase, accumulate = self.phase(step), self.config.grad_accum
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        total, parts = torch.zeros(()), {}
        for part in range(accumulate):
            sync = part == accumulate - 1 or self.ddp is self.model
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss, own = self.ddp(self.batch(step, part), phase)
                (loss / accumulate).backward()
            total = total + loss.detach() / accumulate
            for name, value in own.items():
                parts[name] = parts.get(name, 0) + value / accumulate
        for name, optimizer in self.optimizers.items():
            if phase in ("joint", name):
                optimizer.step()
                self.schedules[name].step()
        return total, parts

    def log_step(self, log: TextIO, entry: dict[str, Any]) -> None:
        """Append the step's entry to the training log; a log that cannot be written (a full
        disk) is a RunError, the last save kept."""
        try:
            log.write(json.dumps(entry) + "\n")
            log.flush()
        except OSError as error:
            raise RunError(f"could not append step {entry['step']} to {self.output / TRAIN_LOG} "
                           f"({error.strerror or error}); the last save is kept and the same command "
                           "resumes from it") from error

    def train(self) -> dict[str, Any]:
        """Steps up to `config.steps`, a save every `save_every` steps and at the end; returns
        the last step's log entry."""
        config = self.config
        if self.ranks.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            for partial in self.output.glob("step-*.partial"):  # a save that a kill interrupted
                shutil.rmtree(partial, ignore_errors=True)
            keep_log_until(self.output / TRAIN_LOG, self.step)
        entry: dict[str, Any] = {}
        progress = Progress(TextColumn("train {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.2f} steps/s"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                            disable=not self.ranks.is_main)
        with progress, open(self.output / TRAIN_LOG if self.ranks.is_main else os.devnull, "a",
                                 encoding="utf-8") as log:
            bar = progress.add_task(config.objective, total=config.steps, completed=self.step, loss=float("nan"), speed=0.0)
            while self.step < config.steps:
                started = time.perf_counter()
                step = self.step + 1
                loss, parts = self.run_step(step)
                self.step = step
                if config.refresh_every and self.model.passage_encoder is not None and step % config.refresh_every == 0:
                    self.model.refresh_index()
                seconds = time.perf_counter() - started
                entry = {"step": step, "phase": self.phase(step), "loss": mean_over_ranks(loss),
                         **{name: mean_over_ranks(value) for name, value in parts.items()},
                         "seconds": round(seconds, 4),
                         "examples_per_s": round(config.batch_size * config.grad_accum / seconds, 3)}
                if not math.isfinite(entry["loss"]):  # its weights are not saved, nor the step logged
                    raise RunError(f"step {step}: the loss is {entry['loss']}, so training stops; {self.output} "
                                   "keeps its last checkpoint, if any (try a lower --learning-rate)")
                self.log_step(log, entry)
                progress.update(bar, advance=1, loss=entry["loss"], speed=1 / seconds)
                if step % config.save_every == 0 or step == config.steps:
                    self.save()
        return entry
