"""`raghub train`: one command line to a checkpoint folder that `raghub run --checkpoint DIR`
evaluates. Single process, or `torchrun --nproc-per-node N -m raghub train ...` for DDP."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import click

from .config import MIXED_PRECISION, TrainConfig, setting_type

#: more flags for a setting, as the DPR + T5 script spells them
ALIASES = {"learning_rate": ["--lr"]}

HELP = {
    "task": "QA task (name or YAML) whose questions are the training data, e.g. squad-train",
    "output": "checkpoint folder; the same command with the same folder resumes from its last save",
    "objective": "the training objective (listed below)",
    "objective_args": "the objective's options as key=value,... (e.g. temperature=0.1,lm_temperature=0.1)",
    "retriever": "a retriever with trainable encoders (dense, dpr)",
    "encoder": "the retriever's (query) encoder (default: the retriever's own; dense: the embedded all-MiniLM-L6-v2)",
    "passage_encoder": "dpr: the passage encoder (hub id or folder)",
    "n_docs": "passages K per question",
    "model": "the generator: hub id or folder (default: the embedded SmolLM2-135M-Instruct)",
    "steps": "train until this step",
    "batch_size": "questions per step, over all processes",
    "learning_rate": "AdamW learning rate of the generator (its LoRA adapter, or all weights)",
    "retriever_learning_rate": "AdamW learning rate of the retriever's encoder(s)",
    "warmup_steps": "learning rates rise linearly over the first N steps, then stay constant",
    "grad_accum": "batches whose gradients are accumulated per optimizer step",
    "lora_rank": "LoRA rank of the generator's adapter; 0 fine-tunes every weight (for small models)",
    "lora_alpha": "LoRA alpha (updates scaled by alpha / rank)",
    "lora_targets": "comma-separated generator layers the adapter modifies",
    "alternate": "N > 0: N steps training the retriever only, then N the generator only, and so on",
    "penalty": "weighted penalties as name=weight,...: repetition (unlikelihood), keyword, length",
    "repetition_ngram": "n of the repeated n-grams the repetition penalty discourages",
    "train_passages": "also train a passage encoder (the retrieved passages re-encoded each step)",
    "refresh_every": "with --train-passages: re-embed the whole corpus every N steps (0: never)",
    "save_every": "save a checkpoint every N steps (and at the last)",
    "seed": "seed of the data order and the adapter's initialisation",
    "mixed_precision": "bf16: the generator's forward pass under bfloat16 autocast (about 2x faster on CPUs with "
                       "AVX-512 BF16); no: float32",
    "limit": "train on the first N questions of the task only",
    "data_dir": "local datasets folder",
}


class TrainCommand(click.Command):
    """`raghub train`, whose help lists the installed objectives and their options."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        host = ctx.find_root().obj
        if host is None:
            return
        found = host.registry
        with formatter.section("Objectives (--objective; --objective-args takes their options)"):
            formatter.write_dl([(name, f"{cls.description} [options: {', '.join(cls.options) or 'none'}]")
                                for name, cls in sorted(found.objectives.items())])


def add_train_command(cli: click.Group) -> None:
    """Add `raghub train`, one flag per `TrainConfig` field."""

    @click.pass_obj
    def train(host: Any, **given: Any) -> None:
        """Train a retriever and generator for RAG and write a checkpoint folder."""
        from .trainer import Trainer

        trainer = Trainer(TrainConfig(**{k: v for k, v in given.items() if v is not None}), host.registry)
        last = trainer.train()
        if trainer.ranks.is_main:
            click.echo(f"trained to step {trainer.step} (loss {last.get('loss', float('nan')):.4f}); "
                       f"checkpoint in {trainer.output}", err=True)

    command = click.command("train", cls=TrainCommand)(train)
    for spec in fields(TrainConfig):
        flags = ["--" + spec.name.replace("_", "-"), *ALIASES.get(spec.name, [])]
        kind: Any = setting_type(spec)  # TrainConfig checks the bounds
        if spec.name == "mixed_precision":
            kind = click.Choice(MIXED_PRECISION)
        required = spec.name in ("task", "output")
        if kind is bool:
            option = click.option(*flags, spec.name, is_flag=True, default=None, help=HELP[spec.name])
        else:
            option = click.option(*flags, spec.name, type=kind, default=None, required=required, help=HELP[spec.name],
                                  envvar="RAGHUB_DATA_DIR" if spec.name == "data_dir" else None)
        command = option(command)
    cli.add_command(command)
