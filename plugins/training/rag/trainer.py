"""The training loop of `raghub train`: a retriever's query encoder (and optionally its passage
encoder) and a generator's LoRA adapter, trained on a QA task's questions through an objective.

Per step, for each question of the global batch: the query encoder embeds it (with gradients);
the top-K passages are found against the passage embeddings (frozen: query-side training, no
stale index; or, with `train_passages`, the K found re-encoded by a trainable passage encoder,
and the whole index rebuilt every `refresh_every` steps); the scores s_k = q·p_k and the
generator's answer-token log-probs under each f(x, z_k) (the task's prompt with passage k; the
loss covers the answer's tokens only) go to the objective. `alternate N` trains the retriever
alone for N steps (generator frozen), then the generator alone for N, and so on.

Under torchrun (WORLD_SIZE > 1) each process takes its share of the global batch and
DistributedDataParallel (gloo) averages the gradients, so the losses match a single process's.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from raghub import Question, UsageError, answer_continuation
from raghub.cache import Cache, cache_root, fingerprint
from raghub.checkpoints import (GENERATOR, MANIFEST, PASSAGE_ENCODER, QUERY_ENCODER, TRAIN_LOG, TRAINER_STATE,
                                read_checkpoint, write_checkpoint)
from raghub.models import choose_backend
from raghub.settings import parse_key_values, read_task_definition

from .config import TrainConfig
from .penalties import keyword_mass, length_penalty, repetition_unlikelihood

class Distributed:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> float:
        """The mean of `value` over the processes."""
        if self.world > 1:
            value = value.detach().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return float(value.detach())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def load_task(found: Any, spec: str, data_dir: str | None) -> Any:
    """The QA task named `spec` (a registered name or a task YAML path)."""
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        definition = read_task_definition(spec)
    elif spec in found.tasks:
        definition = found.tasks[spec]
    else:
        raise UsageError(f"unknown task '{spec}'; see `raghub tasks`")
    family = found.task_families.get(definition.get("family"))
    if family is None:
        raise UsageError(f"task '{spec}' needs the task family '{definition.get('family')}', which is not installed")
    family.check_definition(definition)
    return family(definition["name"], definition, data_dir, registry=found)


def answer_logprobs(logits: torch.Tensor, targets: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """From the last T+1 positions' logits [N, T+1, V] of left-padded sequences ending in their
    targets: (the log-probs of each target position [N, T, V], the targets' token log-probs
    [N, T]), right-aligned, with 0 before a shorter target."""
    width = logits.shape[1] - 1
    logprobs = logits[:, :-1].float().log_softmax(-1)
    ids = torch.zeros(len(targets), width, dtype=torch.long)
    mask = torch.zeros(len(targets), width)
    for row, target in enumerate(targets):
        ids[row, width - len(target):] = torch.tensor(target)
        mask[row, width - len(target):] = 1
    return logprobs, logprobs.gather(-1, ids[..., None])[..., 0] * mask


class RagModel(torch.nn.Module):
    """Query encoder, optional trainable passage encoder and generator, and one step's loss."""

    def __init__(self, query_encoder: Any, passage_encoder: Any, generator: Any, lm: Any, passages: list,
                 passage_matrix: torch.Tensor, objective: Any, config: TrainConfig):
        super().__init__()
        self.query_encoder = query_encoder
        self.passage_encoder = passage_encoder
        self.generator = generator
        self.lm = lm
        self.passages = passages
        self.passage_matrix = passage_matrix
        self.objective = objective
        self.config = config
        self.penalties = config.penalty_weights()
        self.stop_ids = sorted({lm.tokenizer.eos_token_id, *lm.encode("\n")} - {None})

    def embed(self, encoder: Any, texts: Sequence[str]) -> torch.Tensor:
        """Unit-normalised embeddings through the encoder's torch modules, with gradients."""
        features = (getattr(encoder, "preprocess", None) or encoder.tokenize)(list(texts))  # renamed in v5
        return torch.nn.functional.normalize(encoder(features)["sentence_embedding"], dim=-1)

    def retrieve(self, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-K passage positions [B, K], their scores q·p [B, K])."""
        queries = self.embed(self.query_encoder, [q.query for q in questions])
        top = (queries.detach() @ self.passage_matrix.T).topk(self.config.n_docs, dim=-1).indices
        if self.passage_encoder is None:
            found = self.passage_matrix[top]
        else:
            texts = [self.passages[i].as_text() for i in top.flatten().tolist()]
            found = self.embed(self.passage_encoder, texts).view(*top.shape, -1)
        return top, (queries[:, None, :] * found).sum(-1)

    def generate_logprobs(self, questions: Sequence[Question], top: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """The answer's token log-probs under each passage's prompt [B, K, T], the log-probs of
        every answer position [B·K, T, V], and the answers' token ids."""
        prompts, targets = [], []
        for question, row in zip(questions, top.tolist()):
            for position in row:
                prompt = question.prompt([self.passages[position]])
                prompts.append(self.lm.encode(prompt))
                targets.append(self.lm.encode(answer_continuation(prompt, question.answers[0])))
        sequences = [p + t for p, t in zip(prompts, targets)]
        width = max(map(len, sequences))
        pad = self.lm.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            logits = self.generator(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                    logits_to_keep=max(map(len, targets)) + 1).logits
        logprobs, token_logprobs = answer_logprobs(logits, targets)
        return token_logprobs.view(*top.shape, -1), logprobs, targets

    def penalty_terms(self, questions: Sequence[Question], logprobs: torch.Tensor, targets: list) -> dict[str, torch.Tensor]:
        """Each weighted penalty, averaged over the (question, passage) rows."""
        terms: dict[str, list[torch.Tensor]] = {name: [] for name in self.penalties}
        for row, target in enumerate(targets):
            question = questions[row // self.config.n_docs]
            own = logprobs[row, logprobs.shape[1] - len(target):]
            if "repetition" in terms:
                terms["repetition"].append(repetition_unlikelihood(own, target, self.config.repetition_ngram))
            if "keyword" in terms:
                keywords = {t for word in question.question.split() if len(word) >= 4
                            for t in self.lm.encode(" " + word.strip("?,.!"))} - set(target)
                terms["keyword"].append(keyword_mass(own, sorted(keywords)))
            if "length" in terms:
                terms["length"].append(length_penalty(own, self.stop_ids))
        return {name: torch.stack(values).mean() for name, values in terms.items()}

    def forward(self, questions: Sequence[Question], phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This process's share of a step's loss (the mean over its questions) and its parts.
        `phase` is "joint", "retriever" (generator frozen) or "generator" (retriever frozen)."""
        with torch.set_grad_enabled(phase != "generator"):
            top, scores = self.retrieve(questions)
        with torch.set_grad_enabled(phase != "retriever"):
            doc_logprobs, logprobs, targets = self.generate_logprobs(questions, top)
        loss = self.objective.loss(scores, doc_logprobs).mean()
        parts = {"objective": loss.detach()}
        if phase != "retriever" and self.penalties:
            for name, value in self.penalty_terms(questions, logprobs, targets).items():
                loss = loss + self.penalties[name] * value
                parts[name] = value.detach()
        return loss, parts

    @torch.no_grad()
    def refresh_index(self) -> None:
        """Re-embed every passage with the current passage encoder."""
        texts = [p.as_text() for p in self.passages]
        self.passage_matrix = torch.cat([self.embed(self.passage_encoder, texts[i : i + 64])
                                         for i in range(0, len(texts), 64)])


class Trainer:
    """Builds the models from a `TrainConfig`, resumes from the output folder's last save,
    trains, logs and saves."""

    def __init__(self, config: TrainConfig, found: Any):
        from peft import LoraConfig, get_peft_model

        self.config = config
        self.dist = Distributed()
        if config.batch_size % self.dist.world:
            raise UsageError(f"--batch-size {config.batch_size} must be a multiple of the {self.dist.world} processes")
        if config.objective not in found.objectives:
            raise UsageError(f"unknown objective '{config.objective}' (known: {', '.join(sorted(found.objectives))})")
        objective_class = found.objectives[config.objective]
        arguments = parse_key_values(config.objective_args, "--objective-args")
        unknown = sorted(arguments.keys() - objective_class.options.keys())
        if unknown:
            raise UsageError(f"--objective-args: objective '{config.objective}' has no option {', '.join(unknown)} "
                             f"(it takes: {', '.join(objective_class.options) or 'none'})")
        self.objective = objective_class(**{k: objective_class.options[k].convert(k, v, f"--objective-args {k}")
                                            for k, v in arguments.items()})
        if config.retriever not in found.retrievers:
            raise UsageError(f"unknown retriever '{config.retriever}'; see `raghub retrievers`")
        self.output = Path(config.output)
        self.resumed = read_checkpoint(self.output) if (self.output / MANIFEST).exists() else None
        if self.resumed and self.resumed.manifest["fingerprint"] != config.fingerprint():
            raise UsageError(f"--output {self.output} holds a checkpoint of another training configuration; "
                             "give another --output (or the same settings to resume)")
        self.task = load_task(found, config.task, config.data_dir)
        self.lm = choose_backend(found, config.model).load(config.model, "cpu", "float32", config.batch_size)
        if not hasattr(self.lm, "hf_model"):
            raise UsageError(f"raghub train needs a transformers model; {self.lm.name} is not one")
        self.questions = [q for q in self.task.examples(self.lm, config.limit) if isinstance(q, Question) and q.answers]
        if not self.questions:
            raise UsageError(f"task '{config.task}' has no questions with answers to train on")
        retriever = found.retrievers[config.retriever](Cache(cache_root()), encoder=config.encoder)
        if not hasattr(retriever, "encoder") or not hasattr(retriever, "passage_embeddings"):
            raise UsageError(f"retriever '{config.retriever}' has no trainable encoder; use --retriever dense")
        passages, corpus_label = self.task.corpus()
        self.corpus_label = corpus_label
        query_encoder = retriever.encoder
        if self.resumed:
            query_encoder = type(query_encoder)(str(self.resumed.part(QUERY_ENCODER)), device="cpu")
        passage_encoder = None
        if config.train_passages:
            saved = self.resumed.part(PASSAGE_ENCODER) if self.resumed else None
            passage_encoder = type(query_encoder)(str(saved), device="cpu") if saved else copy.deepcopy(retriever.encoder)
        matrix = torch.from_numpy(retriever.passage_embeddings(passages, fingerprint(
            [(p.id, p.title, p.text, p.group) for p in passages])))
        generator = self.lm.hf_model
        for parameter in generator.parameters():
            parameter.requires_grad_(False)
        if self.objective.trains_generator:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                generator = get_peft_model(generator, LoraConfig(
                    r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                    target_modules=[t.strip() for t in config.lora_targets.split(",") if t.strip()]))
            if self.resumed:
                self._load_adapter(generator)
        for encoder in (query_encoder, passage_encoder):
            if encoder is not None:
                encoder.eval()  # no dropout: steps are deterministic, so a resumed run repeats them exactly
        self.model = RagModel(query_encoder, passage_encoder, generator, self.lm, passages, matrix,
                              self.objective, config)
        if passage_encoder is not None and self.resumed:
            self.model.refresh_index()
        self.optimizers = self._optimizers()
        self.step = self.resumed.manifest["step"] if self.resumed else 0
        if self.resumed:
            states = torch.load(self.resumed.part(TRAINER_STATE), weights_only=True)
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(states[name])
        self.ddp = self.model
        if self.dist.world > 1:
            # unused: an encoder's pooler, and the frozen side in an alternating phase
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)

    def _load_adapter(self, generator: Any) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(generator, load_file(str(self.resumed.part(GENERATOR) / "adapter_model.safetensors")))

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW for the retriever's encoders, one for the generator's adapter (stepped only
        in their own phases)."""
        retriever = [p for encoder in (self.model.query_encoder, self.model.passage_encoder) if encoder is not None
                     for p in encoder.parameters()]
        optimizers = {"retriever": torch.optim.AdamW(retriever, lr=self.config.retriever_learning_rate)}
        if self.objective.trains_generator:
            adapter = [p for p in self.model.generator.parameters() if p.requires_grad]
            optimizers["generator"] = torch.optim.AdamW(adapter, lr=self.config.learning_rate)
        return optimizers

    def phase(self, step: int) -> str:
        """Which side trains at `step` (1-based)."""
        if not self.objective.trains_generator:
            return "retriever"
        if not self.config.alternate:
            return "joint"
        return "retriever" if (step - 1) // self.config.alternate % 2 == 0 else "generator"

    def batch(self, step: int) -> list[Question]:
        """This process's share of step `step`'s global batch: consecutive questions of a
        seeded shuffle, reshuffled every epoch."""
        size, count = self.config.batch_size, len(self.questions)
        share = size // self.dist.world
        chosen = []
        for position in range((step - 1) * size + self.dist.rank * share, (step - 1) * size + (self.dist.rank + 1) * share):
            epoch, index = divmod(position, count)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed + epoch))
            chosen.append(self.questions[int(order[index])])
        return chosen

    def manifest(self) -> dict[str, Any]:
        definition = self.task.config
        return {
            "config": asdict(self.config), "fingerprint": self.config.fingerprint(),
            "objective": self.config.objective, "model": self.lm.name, "model_fingerprint": self.lm.fingerprint,
            "encoder": self.config.encoder, "world_size": self.dist.world,
            "trained_on": {"task": self.task.name, "source": definition.get("source"),
                           "articles": definition.get("articles"), "questions": len(self.questions),
                           "corpus": self.corpus_label},
        }

    def save(self) -> None:
        def parts(folder: Path) -> None:
            if self.objective.trains_generator:
                self.model.generator.save_pretrained(str(folder / GENERATOR))
            self.model.query_encoder.save(str(folder / QUERY_ENCODER))
            if self.model.passage_encoder is not None:
                self.model.passage_encoder.save(str(folder / PASSAGE_ENCODER))
            torch.save({name: o.state_dict() for name, o in self.optimizers.items()}, folder / TRAINER_STATE)

        if self.dist.main:
            write_checkpoint(self.output, self.step, self.manifest(), parts)
        self.dist.barrier()

    def _log_lines_until(self, step: int) -> None:
        """Drop the log lines of steps after `step` (computed after the last save, and repeated now)."""
        log = self.output / TRAIN_LOG
        if log.exists():
            kept = [line for line in log.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def train(self) -> dict[str, Any]:
        """Steps up to `config.steps`, a save every `save_every` steps and at the end; returns
        the last step's log entry."""
        config = self.config
        if self.dist.main:
            self.output.mkdir(parents=True, exist_ok=True)
            for partial in self.output.glob("step-*.partial"):  # a save that a kill interrupted
                shutil.rmtree(partial, ignore_errors=True)
            self._log_lines_until(self.step)
        entry: dict[str, Any] = {}
        progress = Progress(TextColumn("train {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.2f} steps/s"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                            disable=not self.dist.main)
        with progress, open(self.output / TRAIN_LOG if self.dist.main else os.devnull, "a",
                                 encoding="utf-8") as log:
            bar = progress.add_task(config.objective, total=config.steps, completed=self.step, loss=float("nan"), speed=0.0)
            while self.step < config.steps:
                started = time.perf_counter()
                step = self.step + 1
                phase = self.phase(step)
                for optimizer in self.optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                loss, parts = self.ddp(self.batch(step), phase)
                loss.backward()
                for name, optimizer in self.optimizers.items():
                    if phase in ("joint", name):
                        optimizer.step()
                self.step = step
                if config.refresh_every and self.model.passage_encoder is not None and step % config.refresh_every == 0:
                    self.model.refresh_index()
                seconds = time.perf_counter() - started
                entry = {"step": step, "phase": phase, "loss": self.dist.mean(loss),
                         **{name: self.dist.mean(value) for name, value in parts.items()},
                         "seconds": round(seconds, 4), "examples_per_s": round(config.batch_size / seconds, 3)}
                log.write(json.dumps(entry) + "\n")
                log.flush()
                progress.update(bar, advance=1, loss=entry["loss"], speed=1 / seconds)
                if step % config.save_every == 0 or step == config.steps:
                    self.save()
        return entry
