"""The results store (one JSON record per line in `records.jsonl`) and the leaderboard.

A leaderboard row is one configuration: the task and its resolved configuration (task config
and corpus fingerprints), method, retriever, model, the dtype it ran in, n_docs, settings and
number of examples; its newest record is shown. Values read `mean ± standard error` where the
record has a standard error (`record["stderr"]`), and a column's best value is bold only when
it beats the runner-up by more than their combined standard error: never without standard
errors, never in a one-row table, never in count columns.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from raghub.cache import fingerprint
from raghub.errors import UsageError

RECORDS_FILE = "records.jsonl"
ROW_KEY = ("task", "method", "retriever", "model", "n_docs", "settings", "n_examples")
LEGEND = ("Values are mean ± standard error where the record has one. A best value is bold only "
          "when it beats the runner-up by more than their combined standard error.")
#: (value, standard error or None) of one metric of one row
Lookup = Callable[[dict[str, Any], str], tuple[Any, Any]]
#: what the leaderboard needs of every record
RECORD_KEYS = ("task", "method", "n_examples", "metrics")


def _ends_mid_line(handle) -> bool:
    """True when the open binary file is not empty and does not end in a newline."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return False
    handle.seek(size - 1)
    return handle.read(1) != b"\n"


def append_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append one record as a line of JSON, flushed to disk before returning. It starts on a
    fresh line, so a line torn by a writer that crashed does not swallow it."""
    path = Path(results_dir) / RECORDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fresh_line = "\n" if _ends_mid_line(handle) else ""
        handle.write((fresh_line + json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    return path


def _is_record(value: Any) -> bool:
    """Whether a JSON value is a record the leaderboard can show: an object with `RECORD_KEYS`,
    its metrics an object."""
    return (isinstance(value, dict) and all(key in value for key in RECORD_KEYS)
            and isinstance(value["metrics"], dict))


def read_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored record, oldest first; a line that is not JSON, or JSON but not a record, is
    skipped and named on stderr."""
    path = Path(results_dir) / RECORDS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError:  # not JSON, or not even UTF-8
                print(f"{path}, line {number}: skipped, not a JSON record", file=sys.stderr)
                continue
            if _is_record(value):
                records.append(value)
            else:
                print(f"{path}, line {number}: skipped, not a record (a record is a JSON object "
                      f"with {', '.join(RECORD_KEYS)})", file=sys.stderr)
    return records


def task_config_fingerprint(record: dict[str, Any]) -> str | None:
    """A short fingerprint of the record's resolved task configuration, leaving out where the
    task's YAML file lies (None for a record without a config)."""
    task = (record.get("config") or {}).get("task")
    if task is None:
        return None
    definition = {key: value for key, value in (task.get("config") or {}).items() if key != "source"}
    return fingerprint({**task, "config": definition})[:8]


def corpus_fingerprint(record: dict[str, Any]) -> str | None:
    """The fingerprint of the passages the record's run retrieved from (None: none)."""
    return ((record.get("config") or {}).get("corpus") or {}).get("fingerprint")


def run_dtype(record: dict[str, Any]) -> str | None:
    """The dtype the record's model ran in (None for a record that does not say)."""
    return (record.get("hardware") or {}).get("dtype")


def _row_key(record: dict[str, Any]) -> tuple:
    return (*(str(record.get(key)) for key in ROW_KEY),
            task_config_fingerprint(record), corpus_fingerprint(record), run_dtype(record))


def latest_per_row(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record of each leaderboard row (see the module's docstring), sorted."""
    latest: dict[tuple, dict[str, Any]] = {}
    for record in records:
        latest[_row_key(record)] = record
    return sorted(latest.values(), key=lambda r: (r["task"], r["method"], str(r.get("retriever")),
                                                  r.get("n_docs") or 0, r.get("settings", ""),
                                                  str(task_config_fingerprint(r)), str(run_dtype(r))))


def _format(value: Any, stderr: Any = None) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")
    return "–" if value is None or value == "" else str(value)


def clear_winner(cells: Sequence[tuple[Any, Any]], higher_is_better: bool) -> int | None:
    """The position of the best of (value, standard error) cells when it beats the runner-up by
    more than sqrt(se_best² + se_runner_up²); None with fewer than two values, or when either
    of the two has no standard error."""
    ranked = sorted((i for i, (value, _) in enumerate(cells) if isinstance(value, (int, float))),
                    key=lambda i: cells[i][0], reverse=higher_is_better)
    if len(ranked) < 2:
        return None
    (best, best_se), (runner_up, runner_up_se) = cells[ranked[0]], cells[ranked[1]]
    if not isinstance(best_se, (int, float)) or not isinstance(runner_up_se, (int, float)):
        return None
    return ranked[0] if abs(best - runner_up) > math.hypot(best_se, runner_up_se) else None


def _table(rows: list[dict[str, Any]], metrics: list[str], higher: dict[str, bool],
           lookup: Lookup) -> list[str]:
    """A markdown table of `rows`; only metrics in `higher` (ranked ones) can be bold."""
    winners = {metric: clear_winner([lookup(row, metric) for row in rows], higher[metric])
               for metric in metrics if metric in higher}
    columns = {name: [label(row) for row in rows]
               for name, label in (("task config", task_config_fingerprint), ("dtype", run_dtype))}
    labels = {name: values for name, values in columns.items() if len(set(values)) > 1}
    header = ["method", "settings", "retriever", "n_docs", "model", "n_examples", "datastore",
              *labels, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for position, row in enumerate(rows):
        cells = [_format(row.get(k)) for k in ("method", "settings", "retriever", "n_docs",
                                               "model", "n_examples", "corpus")]
        cells += [_format(values[position]) for values in labels.values()]
        for metric in metrics:
            text = _format(*lookup(row, metric))
            cells.append(f"**{text}**" if winners.get(metric) == position else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _headline(row: dict[str, Any], metric: str) -> tuple[Any, Any]:
    return row["metrics"].get(metric), (row.get("stderr") or {}).get(metric)


def _task_tables(title: str, task_rows: list[dict[str, Any]], by_type: bool) -> list[str]:
    """The headline table of one task's rows and, with `by_type`, one table per question type
    (whose values have no standard errors, so nothing there is bold)."""
    higher: dict[str, bool] = {}
    for row in task_rows:
        higher.update(row.get("higher_is_better", {}))
    metrics = [m for m in higher if any(isinstance(r["metrics"].get(m), (int, float)) for r in task_rows)]
    out = [f"## {title}", ""]
    out += _table(task_rows, metrics, higher, _headline)
    out.append("")
    if by_type:
        types = sorted({t for r in task_rows for t in r["metrics"].get("by_type", {})})
        for type_name in types:
            out += [f"### {title} — {type_name}", ""]
            type_metrics = sorted({m for r in task_rows for m in r["metrics"].get("by_type", {}).get(type_name, {})})
            out += _table(task_rows, type_metrics, higher, lambda row, m, t=type_name:
                          (row["metrics"].get("by_type", {}).get(t, {}).get(m), None))
            out.append("")
    return out


def leaderboard_markdown(records: list[dict[str, Any]], tasks: Sequence[str] = (),
                         by_type: bool = False) -> str:
    """One markdown table per task and number of examples: a row per configuration (its newest
    record), a column per headline metric; `by_type` adds per-type tables. Rows of one table
    whose task configurations or dtypes differ get a `task config` or `dtype` column telling
    them apart."""
    rows = [r for r in latest_per_row(records) if not tasks or r["task"] in tasks]
    out: list[str] = []
    for task_name in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task_name]
        sizes = sorted({r["n_examples"] for r in task_rows}, reverse=True)
        for size in sizes:  # runs on the first N examples are ranked only against each other
            title = task_name if len(sizes) == 1 else f"{task_name}, {size} examples"
            out += _task_tables(title, [r for r in task_rows if r["n_examples"] == size], by_type)
    return "\n".join([*out, LEGEND]) + "\n" if out else "No records yet.\n"


# --------------------------------------------------------------------------- samples logs

#: the folder, inside the results store, of each run's samples log, `<record id>.jsonl`
SAMPLES_FOLDER = "samples"


def find_record(results_dir: str | Path, reference: str) -> dict[str, Any]:
    """The record whose id is `reference`, or the only one whose id starts with it, or with
    `latest` the newest record that has an id; a UsageError names what went wrong."""
    records = [r for r in read_records(results_dir) if "id" in r]
    if reference == "latest":
        found = records[-1:]
    else:
        found = ([r for r in records if r["id"] == reference]
                 or [r for r in records if r["id"].startswith(reference)])
    if not found:
        raise UsageError(f"no record '{reference}' in {Path(results_dir) / RECORDS_FILE} "
                         "(records written before raghub gave records ids have none)")
    if len(found) > 1:
        ids = ", ".join(r["id"] for r in found[:5])
        raise UsageError(f"'{reference}' is the start of {len(found)} record ids ({ids}"
                         f"{', ...' if len(found) > 5 else ''}); give more of the id")
    return found[0]


def read_samples(results_dir: str | Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The lines of a record's samples log, one per example, in the run's order."""
    if "samples" not in record:
        raise UsageError(f"record {record['id']} has no samples log")
    path = Path(results_dir) / record["samples"]
    if not path.is_file():
        raise UsageError(f"the samples log of record {record['id']}, {path}, is missing")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
