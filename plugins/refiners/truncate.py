"""`truncate`: each passage cut to its first `--refine-tokens` tokens (the run's model's)."""

from __future__ import annotations

from typing import Sequence

from raghub import Option, Passage, Refiner, hookimpl


class TruncateRefiner(Refiner):
    name = "truncate"
    description = "keeps the first --refine-tokens tokens of each passage"
    options = {"refine_tokens": Option(int, 128, "tokens a refiner keeps (truncate: of each passage; extractive: "
                                                 "of all the passages of a query)", at_least=1)}

    def refine(self, queries: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[list[str]]:
        budget = self.settings["refine_tokens"]
        return [[self.truncated(passage.text, budget) for passage in own] for own in passages]

    def truncated(self, text: str, budget: int) -> str:
        """`text` itself when it is no longer than `budget` tokens, else its first `budget`."""
        ids = self.model.encode(text)
        return text if len(ids) <= budget else self.model.decode(ids[:budget])


@hookimpl
def register_refiners(register):
    register(TruncateRefiner)
