"""`raghub train`'s settings, importable without torch (the command's flags are made from them
when raghub starts)."""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, fields
from typing import Any

from raghub import Option, UsageError, fingerprint, parse_key_values

#: the penalties of `--penalty` (see `penalties`)
PENALTIES = ("repetition", "keyword", "length")
#: `--mixed-precision` choices: none, or the generator's forward pass under bfloat16 autocast
MIXED_PRECISION = ("no", "bf16")
#: the bounds of each numeric setting (as `Option` takes them; a float must also be finite)
BOUNDS: dict[str, dict[str, float]] = {
    **{name: {"at_least": 1} for name in ("n_docs", "steps", "batch_size", "grad_accum", "repetition_ngram",
                                          "save_every", "limit")},
    **{name: {"at_least": 0} for name in ("warmup_steps", "lora_rank", "alternate", "refresh_every",
                                          "learning_rate", "retriever_learning_rate")},
    "lora_alpha": {"above": 0},
}
#: a penalty's weight: a negative one would reward the behaviour it penalises
PENALTY_WEIGHT = Option(float, None, "weight of a penalty", at_least=0)
#: settings that do not change what a step computes: left out of the training fingerprint
NOT_FINGERPRINTED = ("steps", "save_every", "output", "data_dir")


def setting_type(spec: Field) -> Any:
    """The type of a `TrainConfig` field (int, float, bool or str; `int | None` is int)."""
    return {"int": int, "float": float, "bool": bool}.get(str(spec.type).split(" |")[0], str)


@dataclass
class TrainConfig:
    """Everything `raghub train` was given (the manifest stores it whole)."""

    task: str
    output: str
    objective: str = "rag-sequence"
    objective_args: str = ""
    retriever: str = "dense"
    encoder: str | None = None
    passage_encoder: str | None = None
    n_docs: int = 3
    model: str | None = None
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-4
    retriever_learning_rate: float = 1e-5
    warmup_steps: int = 0
    grad_accum: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    alternate: int = 0
    penalty: str = ""
    repetition_ngram: int = 1
    train_passages: bool = False
    refresh_every: int = 0
    save_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"
    limit: int | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        """Every numeric setting within its `BOUNDS` and finite, and the penalties known and
        weighted alike, or a UsageError naming the flag, before anything loads."""
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name in BOUNDS and value is not None:
                Option(setting_type(spec), None, "", **BOUNDS[spec.name]).convert(spec.name, value)
        self.penalty_weights()

    def fingerprint(self) -> str:
        return fingerprint({k: v for k, v in asdict(self).items() if k not in NOT_FINGERPRINTED})

    def retriever_settings(self) -> dict[str, str]:
        """The retriever's options given on the command line (its defaults otherwise)."""
        return {key: value for key, value in (("encoder", self.encoder), ("passage_encoder", self.passage_encoder))
                if value is not None}

    def penalty_weights(self) -> dict[str, float]:
        weights = parse_key_values(self.penalty, "--penalty")
        unknown = sorted(weights.keys() - set(PENALTIES))
        if unknown:
            raise UsageError(f"--penalty: unknown penalty {', '.join(unknown)} (known: {', '.join(PENALTIES)})")
        return {name: PENALTY_WEIGHT.convert(name, value, f"--penalty {name}") for name, value in weights.items()}
