"""What a method did for each example while it worked: the retrieval calls it made (`retrievals`:
each query and what came back) and the tokens it generated (`generated_tokens`), which the
runner adds to the example's line of the samples log; the record's `method_stats` gets their
means over the examples, and the tokens a refiner kept of the passages read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover - type names only: interfaces imports this module
    from raghub.interfaces import Example, Retrieved
    from raghub.models import Generation


def first_words(text: str, count: int = 12) -> str:
    """The first `count` words of `text`, with "…" when there are more."""
    words = text.split(maxsplit=count)
    return " ".join(words[:count]) + (" …" if len(words) > count else "")


#: a samples-log line's tokens retrieved of the passages a refiner emptied, which no hit shows
DROPPED = "refiner_dropped_tokens"

#: what the stages after the first retriever note of a passage (`Retrieved`), in its fields
STAGE_FIELDS = ("first_rank", "first_score", "tokens_kept", "tokens_retrieved")


def passage_fields(retrieved: Sequence[Retrieved]) -> list[dict[str, Any]]:
    """Retrieved passages as the samples log holds them: id, title, the text's first words,
    score and rank, best first, and what a reranker or refiner noted (`STAGE_FIELDS`, where set)."""
    return [{"id": hit.passage.id, "title": hit.passage.title, "text_start": first_words(hit.passage.text),
             "score": hit.score, "rank": rank,
             **{name: getattr(hit, name) for name in STAGE_FIELDS if getattr(hit, name) is not None}}
            for rank, hit in enumerate(retrieved, start=1)]


class WorkLog:
    """Each example's retrieval calls and generated tokens, by example id, until the runner
    takes them for the example's line."""

    def __init__(self) -> None:
        self.by_example: dict[str, dict[str, Any]] = {}

    def add_retrievals(self, examples: Sequence[Example], queries: Sequence[str],
                       retrieved: Sequence[Sequence[Retrieved]]) -> None:
        """Query i and its hits, as the next step of examples[i]; `gold` stays None for the
        task to fill in where it knows its gold passages."""
        for example, query, hits in zip(examples, queries, retrieved):
            calls = self.by_example.setdefault(example.id, {}).setdefault("retrievals", [])
            calls.append({"step": len(calls) + 1, "query": query,
                          "hits": [{**fields, "gold": None} for fields in passage_fields(hits)]})

    def add_generated(self, examples: Sequence[Example], generations: Sequence[Generation]) -> None:
        """Generation i's tokens, counted for examples[i]."""
        for example, generation in zip(examples, generations):
            entry = self.by_example.setdefault(example.id, {})
            entry["generated_tokens"] = entry.get("generated_tokens", 0) + len(generation.token_logprobs)

    def add_dropped(self, example: Example, tokens: int) -> None:
        """Tokens retrieved of passages a refiner emptied (left out of what the method reads),
        counted for the example when there are any."""
        if tokens:
            entry = self.by_example.setdefault(example.id, {})
            entry[DROPPED] = entry.get(DROPPED, 0) + tokens

    def take(self, example_id: str) -> dict[str, Any]:
        """The example's fields for its samples-log line (none when the method logged nothing),
        forgotten here."""
        return self.by_example.pop(example_id, {})


def work_means(lines: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The mean retrieval calls and generated tokens per example, over every line of a run
    whose method logged them (an example without any counts 0)."""
    means = {}
    for key, stat, count in (("retrievals", "retrieval_calls_per_example", len),
                             ("generated_tokens", "generated_tokens_per_example", int)):
        if any(key in line for line in lines):
            means[stat] = sum(count(line[key]) for line in lines if key in line) / len(lines)
    return {**means, **refined_tokens(lines)}


def refined_tokens(lines: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The tokens a refiner kept and those retrieved, per example, and the share kept, over every
    passage the examples retrieved (first stage and the method's own calls, the passages it
    emptied too: `DROPPED`); none without a refiner."""
    hits = [hit for line in lines for hit in [*line.get("retrieved", []),
                                              *(h for call in line.get("retrievals", []) for h in call["hits"])]
            if "tokens_retrieved" in hit]
    dropped = sum(line.get(DROPPED, 0) for line in lines)
    if not hits and not dropped:
        return {}
    kept, retrieved = sum(hit["tokens_kept"] for hit in hits), sum(hit["tokens_retrieved"] for hit in hits) + dropped
    return {"refiner_tokens_kept_per_example": kept / len(lines),
            "refiner_tokens_retrieved_per_example": retrieved / len(lines),
            "refiner_tokens_kept_share": kept / retrieved if retrieved else 0.0}
