"""`raghub train`'s settings, importable without torch (the command's flags are made from them
when raghub starts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from raghub import UsageError
from raghub.cache import fingerprint
from raghub.settings import parse_key_values

#: the penalties of `--penalty` (see `penalties`)
PENALTIES = ("repetition", "keyword", "length")
#: `--mixed-precision` choices: none, or the generator's forward pass under bfloat16 autocast
MIXED_PRECISION = ("no", "bf16")
#: the least value of each integer setting
MINIMUM = {"n_docs": 1, "steps": 1, "batch_size": 1, "warmup_steps": 0, "grad_accum": 1, "lora_rank": 0,
           "alternate": 0, "repetition_ngram": 1, "refresh_every": 0, "save_every": 1, "limit": 1}
#: settings that do not change what a step computes: left out of the training fingerprint
NOT_FINGERPRINTED = ("steps", "save_every", "output", "data_dir")


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
        try:
            return {name: float(value) for name, value in weights.items()}
        except ValueError:
            raise UsageError(f"--penalty takes name=weight pairs with numeric weights, not {self.penalty!r}") from None
