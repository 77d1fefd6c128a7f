"""The `Judge` plugin kind (registered through `register_judges`): an LLM judge of answers,
and how its p(yes) becomes a verdict.

A judge gives, for a question, its gold answers and a prediction, the judge model's probability
that the prediction answers the question, p(yes), under each of its prompts (paraphrases of one
instruction), and its raw output. At temperature 0 a verdict is p(yes) > 1/2; above 0 it is
drawn from the judge's yes / no distribution at that temperature, seeded, so that a judged run
is reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from raghub.cache import fingerprint
from raghub.interfaces import Plugin
from raghub.metrics import yes_probability

if TYPE_CHECKING:  # pragma: no cover - type names only
    from raghub.models import LanguageModel


@dataclass(frozen=True)
class Judgeable:
    """What a judge is shown of one example."""

    question: str
    answers: tuple[str, ...]
    prediction: str


class Judge(Plugin):
    """An LLM judge of answers. `p_yes` gives, per example, the judge model's probability that
    the prediction is correct under prompt `prompt` (0 to `n_prompts` − 1) and its raw output
    (what the judge model returned, JSON-serialisable)."""

    #: how many paraphrased prompts it has; repeat r of an example uses prompt r mod n_prompts
    n_prompts: ClassVar[int] = 1
    #: the model capabilities (`raghub.models.CAPABILITIES`) its judge model needs
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: LanguageModel, **options: Any) -> None:
        self.model = model
        self.settings = self.resolve_options(options)

    def p_yes(self, examples: Sequence[Judgeable], prompt: int) -> list[tuple[float, Any]]:
        raise NotImplementedError


def verdict(p_yes: float, temperature: float, seed: Any) -> float:
    """1.0 (correct) or 0.0: p(yes) > 1/2 at temperature 0; else a draw of yes with the
    probability p(yes) takes at `temperature` (its log-odds divided by it), seeded by `seed`."""
    if temperature == 0:
        return float(p_yes > 0.5)
    tiny = 1e-300
    tempered = yes_probability(math.log(max(p_yes, tiny)), math.log(max(1.0 - p_yes, tiny)), temperature)
    return float(random.Random(fingerprint(seed)).random() < tempered)
