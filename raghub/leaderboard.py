"""The leaderboard: markdown tables of the stored records.

A leaderboard row is one configuration: the task and its resolved configuration (task config
and corpus fingerprints; the data files' content aside, shown in a `data` column where rows
differ in it), method, retriever, model, the dtype it ran in, n_docs, settings and
number of examples; its newest record is shown. Values read `mean ± standard error` where the
record has a standard error (`record.stderr`), and a column's best value is bold only when it
beats the runner-up by more than their combined standard error: never without standard errors,
never in a one-row table, never in count columns, never a NaN or an infinity.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

from raghub.cache import fingerprint
from raghub.record import Record

ROW_KEY = ("task", "method", "retriever", "model", "n_docs", "settings", "n_examples")
LEGEND = ("Values are mean ± standard error where the record has one. A best value is bold only "
          "when it beats the runner-up by more than their combined standard error.")
#: (value, standard error or None) of one metric of one row
Lookup = Callable[[Record, str], tuple[Any, Any]]


#: the keys of a task's configuration that hold the content of its data files (`Task.fingerprint`)
DATA_KEYS = frozenset({"data_sha256", "split_sha256"})


def task_config_fingerprint(record: Record) -> str | None:
    """A short fingerprint of the record's resolved task configuration (None for a record
    without one), its data files' content left out (`task_data`): a record stored before the
    content was in it shares its row."""
    task = record.config.get("task")
    return None if task is None else fingerprint({k: v for k, v in task.items() if k not in DATA_KEYS})[:8]


def task_data(record: Record) -> str | None:
    """A short fingerprint of the content of the data files the record's run read (None for a
    record that does not say)."""
    data = {key: value for key, value in (record.config.get("task") or {}).items() if key in DATA_KEYS}
    return fingerprint(data)[:8] if data else None


def corpus_fingerprint(record: Record) -> str | None:
    """The fingerprint of the passages the record's run retrieved from (None: none)."""
    return record.config.get("corpus", {}).get("fingerprint")


def run_dtype(record: Record) -> str | None:
    """The dtype the record's model ran in (None for a record that does not say)."""
    return record.hardware.get("dtype")


def judge_label(record: Record) -> str | None:
    """The judge model of a judged record and a short fingerprint of the judge's settings
    (None for a record not judged)."""
    judge = record.config.get("judge")
    return None if judge is None else f"{judge.get('model_name')} {fingerprint(judge)[:8]}"


def _row_key(record: Record) -> tuple:
    return (*(str(getattr(record, key)) for key in ROW_KEY),
            task_config_fingerprint(record), corpus_fingerprint(record), run_dtype(record))


def latest_per_row(records: Iterable[Record]) -> list[Record]:
    """The newest record of each leaderboard row (see the module's docstring), sorted."""
    latest: dict[tuple, Record] = {}
    for record in records:
        latest[_row_key(record)] = record
    return sorted(latest.values(), key=lambda r: (r.task, r.method, str(r.retriever), r.n_docs, r.settings,
                                                  str(task_config_fingerprint(r)), str(run_dtype(r))))


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _format(value: Any, stderr: Any = None) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")
    return "–" if value is None or value == "" else str(value)


def clear_winner(cells: Sequence[tuple[Any, Any]], higher_is_better: bool) -> int | None:
    """The position of the best of (value, standard error) cells when it beats the runner-up by
    more than sqrt(se_best² + se_runner_up²); None with fewer than two finite values, or when
    either of the two has no finite standard error."""
    ranked = sorted((i for i, (value, _) in enumerate(cells) if _is_finite(value)),
                    key=lambda i: cells[i][0], reverse=higher_is_better)
    if len(ranked) < 2:
        return None
    (best, best_se), (runner_up, runner_up_se) = cells[ranked[0]], cells[ranked[1]]
    if not _is_finite(best_se) or not _is_finite(runner_up_se):
        return None
    return ranked[0] if abs(best - runner_up) > math.hypot(best_se, runner_up_se) else None
def _table(rows: list[Record], metrics: list[str], higher: dict[str, bool],
           lookup: Lookup) -> list[str]:
    """A markdown table of `rows`; only metrics in `higher` (ranked ones) can be bold."""
    winners = {metric: clear_winner([lookup(row, metric) for row in rows], higher[metric])
               for metric in metrics if metric in higher}
    columns = {name: [label(row) for row in rows]
               for name, label in (("task config", task_config_fingerprint), ("data", task_data),
                                   ("dtype", run_dtype), ("judge", judge_label))}
    # data the records do not name (stored before they did) tells no row apart
    labels = {name: values for name, values in columns.items()
              if len(set(values) - ({None} if name == "data" else set())) > 1}
    header = ["method", "settings", "retriever", "n_docs", "model", "n_examples", "datastore",
              *labels, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for position, row in enumerate(rows):
        cells = [_format(getattr(row, k)) for k in ("method", "settings", "retriever", "n_docs",
                                                    "model", "n_examples", "corpus")]
        cells += [_format(values[position]) for values in labels.values()]
        for metric in metrics:
            text = _format(*lookup(row, metric))
            cells.append(f"**{text}**" if winners.get(metric) == position else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _headline(row: Record, metric: str) -> tuple[Any, Any]:
    return row.metrics.get(metric), row.stderr.get(metric)


def _task_tables(title: str, task_rows: list[Record], by_type: bool) -> list[str]:
    """The headline table of one task's rows and, with `by_type`, one table per question type
    (whose values have no standard errors, so nothing there is bold)."""
    higher: dict[str, bool] = {}
    for row in task_rows:
        higher.update(row.higher_is_better)
    metrics = [m for m in higher if any(isinstance(r.metrics.get(m), (int, float)) for r in task_rows)]
    out = [f"## {title}", ""]
    out += _table(task_rows, metrics, higher, _headline)
    out.append("")
    if by_type:
        types = sorted({t for r in task_rows for t in r.metrics.get("by_type", {})})
        for type_name in types:
            out += [f"### {title} — {type_name}", ""]
            type_metrics = sorted({m for r in task_rows for m in r.metrics.get("by_type", {}).get(type_name, {})})
            out += _table(task_rows, type_metrics, higher, lambda row, m, t=type_name:
                          (row.metrics.get("by_type", {}).get(t, {}).get(m), None))
            out.append("")
    return out


def leaderboard_markdown(records: list[Record], tasks: Sequence[str] = (),
                         by_type: bool = False) -> str:
    """One markdown table per task and number of examples: a row per configuration (its newest
    record), a column per headline metric; `by_type` adds per-type tables. Rows of one table
    whose task configurations, data files, dtypes or judges differ get a `task config`, `data`,
    `dtype` or `judge` column telling them apart."""
    rows = [r for r in latest_per_row(records) if not tasks or r.task in tasks]
    out: list[str] = []
    for task_name in sorted({r.task for r in rows}):
        task_rows = [r for r in rows if r.task == task_name]
        sizes = sorted({r.n_examples for r in task_rows}, reverse=True)
        for size in sizes:  # runs on the first N examples are ranked only against each other
            title = task_name if len(sizes) == 1 else f"{task_name}, {size} examples"
            out += _task_tables(title, [r for r in task_rows if r.n_examples == size], by_type)
    return "\n".join([*out, LEGEND]) + "\n" if out else "No records yet.\n"

