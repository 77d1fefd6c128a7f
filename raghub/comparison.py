"""Two runs of the same task compared example by example (`raghub compare`).

The runs' samples are paired by example id. Each metric that is a ratio of sums Σy / Σx
(the task's `metric_terms`; a mean has x = 1) gets the difference R_A − R_B over the shared
examples, its paired standard error (`raghub.metrics.paired_difference`), and how many examples
A does better on, worse on, or the same. What the two runs' configurations differ in beyond the
method (the model, its dtype, the retriever's settings and corpus, the judge, the task's
configuration) is named, since the difference then measures more than the methods.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

from raghub.errors import UsageError
from raghub.metrics import paired_difference
from raghub.record import Record

MetricTerms = Callable[[dict[str, Any]], dict[str, tuple[float, float]]]
Line = dict[str, Any]
#: an example's outcome on a right / wrong metric, run A against run B
OUTCOMES = {(1.0, 1.0): "both right", (1.0, 0.0): "fixed", (0.0, 1.0): "broke", (0.0, 0.0): "both wrong"}
#: whether a gold passage is among what run A retrieved for the example (None: not known)
GOLD_SPLITS = {True: "gold", False: "no gold", None: "unknown"}


def paired_lines(record_a: Record, samples_a: Sequence[Line], record_b: Record,
                 samples_b: Sequence[Line]) -> list[tuple[Line, Line]]:
    """The two runs' sample lines of each example both ran (in A's order); a UsageError for runs
    of different tasks or runs that share no example."""
    if record_a.task != record_b.task:
        raise UsageError(f"records {record_a.id} and {record_b.id} are runs of different "
                         f"tasks ({record_a.task}, {record_b.task}); compare runs of one task")
    by_id = {line["id"]: line for line in samples_b}
    shared = [(line, by_id[line["id"]]) for line in samples_a if line["id"] in by_id]
    if not shared:
        raise UsageError(f"records {record_a.id} and {record_b.id} share no example")
    return shared


def gold_retrieved(line: Line) -> bool | None:
    """Whether a gold passage is among the passages the example's line shows retrieved (first
    stage and the method's own calls); None when none is marked gold or not (a closed-book run)."""
    passages = [*line.get("retrieved", ()), *(hit for call in line.get("retrievals", ()) for hit in call["hits"])]
    marks = [p["gold"] for p in passages if p.get("gold") is not None]
    return any(marks) if marks else None


def outcomes(shared: Sequence[tuple[Line, Line]], name: str,
             metric_terms: MetricTerms) -> dict[str, str] | None:
    """Each shared example's outcome on metric `name` (`OUTCOMES`: both right, fixed = right in
    A only, broke = right in B only, both wrong), by id; None unless the metric scores every
    example it has in both runs 0 or 1 (a right / wrong metric such as EM or match)."""
    found = {}
    for a, b in shared:
        term_a, term_b = metric_terms(a).get(name), metric_terms(b).get(name)
        if term_a is None or term_b is None:
            continue
        outcome = OUTCOMES.get((term_a[0], term_b[0])) if term_a[1] == term_b[1] == 1.0 else None
        if outcome is None:
            return None
        found[a["id"]] = outcome
    return found or None


def outcome_table(shared: Sequence[tuple[Line, Line]], by_id: dict[str, str]) -> dict[str, Any]:
    """The examples' outcomes counted per `GOLD_SPLITS` split of what A retrieved, with the ids
    retrieval fixed and broke."""
    split_of = {a["id"]: GOLD_SPLITS[gold_retrieved(a)] for a, _ in shared}
    table: dict[str, Any] = {}
    for example_id, outcome in by_id.items():
        table.setdefault(split_of[example_id], Counter({name: 0 for name in OUTCOMES.values()}))[outcome] += 1
    return {"splits": {split: dict(counts) for split, counts in table.items()},
            **{outcome: [i for i, found in by_id.items() if found == outcome] for outcome in ("fixed", "broke")}}


def compare_runs(record_a: Record, samples_a: Sequence[Line],
                 record_b: Record, samples_b: Sequence[Line],
                 metric_terms: MetricTerms) -> dict[str, Any]:
    """The paired comparison of run A against run B: per ranked ratio metric, A's and B's value
    on the shared examples, the difference A − B with its paired se, and wins / losses / ties
    counted for A (by the metric's direction); a right / wrong metric adds `outcomes`, the
    examples retrieval fixed and broke split by whether A retrieved a gold passage."""
    shared = paired_lines(record_a, samples_a, record_b, samples_b)
    compared = {}
    for name, higher_is_better in record_a.higher_is_better.items():
        pairs = [(metric_terms(a).get(name), metric_terms(b).get(name)) for a, b in shared]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        if any(a[1] != b[1] for a, b in pairs):
            raise UsageError(f"the examples of records {record_a.id} and {record_b.id} differ "
                             f"in size for {name} (a different tokenizer or windows?)")
        ya, yb, x = [a[0] for a, _ in pairs], [b[0] for _, b in pairs], [a[1] for a, _ in pairs]
        difference, se = paired_difference(ya, yb, x)
        better = [(a - b) if higher_is_better else (b - a) for a, b in zip(ya, yb)]
        compared[name] = {"a": sum(ya) / sum(x), "b": sum(yb) / sum(x), "difference": difference,
                          "se": se, "n": len(pairs), "wins": sum(d > 0 for d in better),
                          "losses": sum(d < 0 for d in better), "ties": sum(d == 0 for d in better)}
        by_id = outcomes(shared, name, metric_terms) if higher_is_better else None
        if by_id is not None:
            compared[name]["outcomes"] = outcome_table(shared, by_id)
    return {"a": record_a.id, "b": record_b.id, "task": record_a.task,
            "n_shared": len(shared), "n_a": len(samples_a), "n_b": len(samples_b), "metrics": compared,
            "differences": differences(record_a, record_b)}


def _flat(value: Any, key: str) -> dict[str, Any]:
    """A nested mapping as {dotted key: value}."""
    if not isinstance(value, dict):
        return {key: value}
    return {flat: inner for name, item in value.items() for flat, inner in _flat(item, f"{key}.{name}").items()}


def differences(record_a: Record, record_b: Record) -> list[str]:
    """'KEY (A: VALUE, B: VALUE)' for each setting beyond the method in which the runs differ:
    the model and its dtype, the retriever's settings and corpus (when both retrieve), the
    judge's settings and model (when both are judged), the task's configuration."""
    def compared(record: Record) -> dict[str, Any]:
        config = record.config
        parts = {"model": record.model, "model_fingerprint": config.get("model_fingerprint"),
                 "dtype": config.get("model_dtype"), "task": config.get("task")}
        if record_a.retriever and record_b.retriever:
            parts |= {"retriever": config.get("retriever") or record.retriever, "corpus": config.get("corpus")}
        if "judge" in record_a.config and "judge" in record_b.config:
            parts |= {"judge": config["judge"]}
        return {flat: value for key, part in parts.items() for flat, value in _flat(part, key).items()}

    a, b = compared(record_a), compared(record_b)
    return [f"{key} (A: {a.get(key)}, B: {b.get(key)})" for key in dict.fromkeys([*a, *b])
            if a.get(key) != b.get(key)]
