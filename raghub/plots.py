"""Figures of stored results (matplotlib, Agg backend), from the leaderboard's rows (each
configuration's newest record, at each task's largest number of examples):

- `lines`: one task's metric against n_docs, a line per method (a closed-book method is a
  dashed horizontal line), with standard-error bars where the records have them;
- `bars`: a metric per dataset (task), a bar per method configuration.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from raghub.distributed import notice
from raghub.errors import UsageError, amount
from raghub.leaderboard import latest_per_row
from raghub.record import Record

KINDS = ("lines", "bars")
FORMATS = (".png", ".svg")


def _largest_sample(rows: list[Record]) -> list[Record]:
    """Each task's rows at its largest number of examples (smaller samples are not comparable);
    the rows left out are named on stderr."""
    largest: dict[str, int] = {}
    for row in rows:
        largest[row.task] = max(largest.get(row.task, 0), row.n_examples)
    left_out = [row for row in rows if row.n_examples != largest[row.task]]
    if left_out:
        notice(f"plot leaves out {amount(len(left_out), 'record')} run on fewer examples than their task's "
               "largest sample: " + "; ".join(
                   f"{row.task} {row.method}{f' n_docs {row.n_docs}' if row.n_docs else ''} {row.id} "
                   f"({row.n_examples} examples, not {largest[row.task]})" for row in left_out))
    return [row for row in rows if row.n_examples == largest[row.task]]


def _metric(rows: list[Record], metric: str | None) -> str:
    """`metric` when some row has it (default: the first metric the rows rank)."""
    ranked = list(dict.fromkeys(m for row in rows for m in row.higher_is_better))
    chosen = metric or (ranked[0] if ranked else None)
    if chosen is None or not any(isinstance(row.metrics.get(chosen), (int, float)) for row in rows):
        raise UsageError(f"no stored record has the metric {chosen!r}; choose one of "
                         f"{', '.join(ranked) or 'none'} with --metric")
    return chosen


def _value(row: Record, metric: str) -> tuple[float, float]:
    """(value, standard error or 0) of a row's metric."""
    return row.metrics[metric], row.stderr.get(metric) or 0.0


def _series_label(row: Record, with_n_docs: bool) -> str:
    parts = [row.method]
    if row.retriever:
        parts.append(row.retriever + (f" k={row.n_docs}" if with_n_docs else ""))
    if row.settings:
        parts.append(row.settings)
    return " · ".join(parts)


def _lines(axes, rows: list[Record], metric: str) -> None:
    series: dict[str, list[Record]] = defaultdict(list)
    for row in rows:
        series[_series_label(row, with_n_docs=False)].append(row)
    for label, points in series.items():
        points.sort(key=lambda r: r.n_docs)
        values = [_value(r, metric) for r in points]
        if all(not r.n_docs for r in points):  # closed book: a baseline across the axis
            axes.axhline(values[-1][0], linestyle="--", color="gray", label=label)
            continue
        axes.errorbar([r.n_docs for r in points], [v for v, _ in values], yerr=[e for _, e in values],
                      marker="o", capsize=3, label=label)
    axes.set_xlabel("passages retrieved (n_docs)")


def _bars(axes, rows: list[Record], metric: str) -> None:
    tasks = sorted({row.task for row in rows})
    series: dict[str, dict[str, Record]] = defaultdict(dict)
    for row in rows:
        series[_series_label(row, with_n_docs=True)][row.task] = row
    width = 0.8 / len(series)
    for position, (label, by_task) in enumerate(sorted(series.items())):
        shown = [t for t in tasks if t in by_task]
        values = [_value(by_task[t], metric) for t in shown]
        axes.bar([tasks.index(t) + position * width for t in shown], [v for v, _ in values], width,
                 yerr=[e for _, e in values], capsize=3, label=label)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)


def plot(records: list[Record], kind: str, tasks: Sequence[str], metric: str | None,
         output: str | Path | None, results_dir: str | Path) -> Path:
    """Draw `kind` from the records into `output` (.png or .svg; default: in `results_dir`,
    named after the task and metric) and return its path. `lines` needs one task: the one
    named, or the only one stored."""
    rows = _largest_sample([row for row in latest_per_row(records) if not tasks or row.task in tasks])
    stored = sorted({row.task for row in rows})
    if not rows:
        raise UsageError(f"no stored records{' of ' + ', '.join(tasks) if tasks else ''} in {results_dir}")
    if kind == "lines" and len(stored) > 1:
        raise UsageError(f"several tasks are stored ({', '.join(stored)}); choose one with --task")
    metric = _metric(rows, metric)
    rows = [row for row in rows if isinstance(row.metrics.get(metric), (int, float))]
    path = Path(output) if output else Path(results_dir) / f"{stored[0] if kind == 'lines' else 'tasks'}-{metric}.png"
    if path.suffix not in FORMATS:
        raise UsageError(f"--output must end in {' or '.join(FORMATS)}, not {path.name}")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    (_lines if kind == "lines" else _bars)(axes, rows, metric)
    sizes = ", ".join(f"{task}: {n}" for task, n in sorted({(r.task, r.n_examples) for r in rows}))
    axes.set_title(f"{metric} (examples: {sizes})", fontsize=9)
    axes.set_ylabel(metric)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    return path
