"""The results store (one JSON record per line in `records.jsonl`) and the leaderboard."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

RECORDS_FILE = "records.jsonl"
ROW_KEY = ("task", "method", "retriever", "model", "n_docs", "settings", "n_examples")
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


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None or value == "" else str(value)


def _latest_per_row(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the newest record of each (task, method, retriever, model, n_docs, settings, size)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for record in records:
        latest[tuple(str(record.get(key)) for key in ROW_KEY)] = record
    return sorted(latest.values(), key=lambda r: (r["task"], r["method"], str(r.get("retriever")),
                                                  r.get("n_docs") or 0, r.get("settings", "")))


def _table(rows: list[dict[str, Any]], metrics: list[str], higher: dict[str, bool],
           lookup) -> list[str]:
    best = {}
    for metric in metrics:
        values = [lookup(row, metric) for row in rows]
        values = [v for v in values if isinstance(v, (int, float))]
        if values:
            best[metric] = max(values) if higher.get(metric, True) else min(values)
    header = ["method", "settings", "retriever", "n_docs", "model", "n_examples", "datastore", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_format(row.get(k)) for k in ("method", "settings", "retriever", "n_docs",
                                               "model", "n_examples", "corpus")]
        for metric in metrics:
            value = lookup(row, metric)
            text = _format(value)
            cells.append(f"**{text}**" if value is not None and value == best.get(metric) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _task_tables(title: str, task_rows: list[dict[str, Any]], by_type: bool) -> list[str]:
    """The headline table of one task's rows and, with `by_type`, one table per question type."""
    higher: dict[str, bool] = {}
    for row in task_rows:
        higher.update(row.get("higher_is_better", {}))
    metrics = [m for m in higher if any(isinstance(r["metrics"].get(m), (int, float)) for r in task_rows)]
    out = [f"## {title}", ""]
    out += _table(task_rows, metrics, higher, lambda row, m: row["metrics"].get(m))
    out.append("")
    if by_type:
        types = sorted({t for r in task_rows for t in r["metrics"].get("by_type", {})})
        for type_name in types:
            out += [f"### {title} — {type_name}", ""]
            type_metrics = sorted({m for r in task_rows for m in r["metrics"].get("by_type", {}).get(type_name, {})})
            out += _table(task_rows, type_metrics, higher, lambda row, m, t=type_name:
                          row["metrics"].get("by_type", {}).get(t, {}).get(m))
            out.append("")
    return out


def leaderboard_markdown(records: list[dict[str, Any]], tasks: Sequence[str] = (),
                         by_type: bool = False) -> str:
    """One markdown table per task and number of examples: a row per configuration (its newest
    record), a column per headline metric, the best value of each column in bold; `by_type`
    adds per-type tables."""
    rows = [r for r in _latest_per_row(records) if not tasks or r["task"] in tasks]
    out: list[str] = []
    for task_name in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task_name]
        sizes = sorted({r["n_examples"] for r in task_rows}, reverse=True)
        for size in sizes:  # runs on the first N examples are ranked only against each other
            title = task_name if len(sizes) == 1 else f"{task_name}, {size} examples"
            out += _task_tables(title, [r for r in task_rows if r["n_examples"] == size], by_type)
    return "\n".join(out).rstrip() + "\n" if out else "No records yet.\n"
