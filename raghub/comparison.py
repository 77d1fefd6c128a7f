"""Two runs of the same task compared example by example (`raghub compare`).

The runs' samples are paired by example id. Each metric that is a ratio of sums Σy / Σx
(the task's `metric_terms`; a mean has x = 1) gets the difference R_A − R_B over the shared
examples, its paired standard error (`raghub.metrics.paired_difference`), and how many examples
A does better on, worse on, or the same. What the two runs' configurations differ in beyond the
method (the model, its dtype, the retriever's settings and corpus, the task's configuration) is
named, since the difference then measures more than the methods.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from raghub.errors import UsageError
from raghub.metrics import paired_difference
from raghub.record import Record

MetricTerms = Callable[[dict[str, Any]], dict[str, tuple[float, float]]]


def compare_runs(record_a: Record, samples_a: Sequence[dict[str, Any]],
                 record_b: Record, samples_b: Sequence[dict[str, Any]],
                 metric_terms: MetricTerms) -> dict[str, Any]:
    """The paired comparison of run A against run B: per ranked ratio metric, A's and B's value
    on the shared examples, the difference A − B with its paired se, and wins / losses / ties
    counted for A (by the metric's direction)."""
    if record_a.task != record_b.task:
        raise UsageError(f"records {record_a.id} and {record_b.id} are runs of different "
                         f"tasks ({record_a.task}, {record_b.task}); compare runs of one task")
    by_id = {line["id"]: line for line in samples_b}
    shared = [(line, by_id[line["id"]]) for line in samples_a if line["id"] in by_id]
    if not shared:
        raise UsageError(f"records {record_a.id} and {record_b.id} share no example")
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
    task's configuration."""
    def compared(record: Record) -> dict[str, Any]:
        config = record.config
        parts = {"model": record.model, "model_fingerprint": config.get("model_fingerprint"),
                 "dtype": config.get("model_dtype"), "task": config.get("task")}
        if record_a.retriever and record_b.retriever:
            parts |= {"retriever": config.get("retriever") or record.retriever, "corpus": config.get("corpus")}
        return {flat: value for key, part in parts.items() for flat, value in _flat(part, key).items()}

    a, b = compared(record_a), compared(record_b)
    return [f"{key} (A: {a.get(key)}, B: {b.get(key)})" for key in dict.fromkeys([*a, *b])
            if a.get(key) != b.get(key)]
