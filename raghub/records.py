"""The results store: a folder holding `records.jsonl`, one JSON record per line (each read
through `Record.from_dict`), and `samples/`, each run's samples log (`.jsonl`, or `.jsonl.gz`
as in the committed leaderboards). raghub reads and writes only inside the folder: a path
that leads out of it (absolute, `..`, a symbolic link) is refused, never followed.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from raghub.errors import RunError, UsageError
from raghub.record import InvalidRecord, Record

RECORDS_FILE = "records.jsonl"
#: the folder, inside the results store, of each run's samples log, `<record id>.jsonl`
SAMPLES_FOLDER = "samples"


def store_file(results_dir: str | Path, relative: str) -> Path:
    """`results_dir / relative`; a UsageError when it leads outside the results folder."""
    root = Path(results_dir)
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"{path} leads outside the results folder {root}; raghub reads and writes "
                         "only inside it")
    return path


def check_store(results_dir: str | Path) -> None:
    """The store's records file and samples folder lie inside it (UsageError otherwise)."""
    store_file(results_dir, RECORDS_FILE)
    store_file(results_dir, SAMPLES_FOLDER)


def samples_file(record_id: str) -> str:
    """Where a new run's samples log goes, relative to the results folder."""
    return f"{SAMPLES_FOLDER}/{record_id}.jsonl"


def _ends_mid_line(handle) -> bool:
    """True when the open binary file is not empty and does not end in a newline."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return False
    handle.seek(size - 1)
    return handle.read(1) != b"\n"


def _append_line(path: Path, line: bytes) -> None:
    """Append a line, on a fresh line (a line torn by a writer that crashed does not swallow
    it), flushed to disk; a failed write is cut off again, leaving the file as it was."""
    with open(path, "a+b", buffering=0) as handle:  # unbuffered: nothing is left to write on close
        fresh_line = b"\n" if _ends_mid_line(handle) else b""
        size = handle.seek(0, os.SEEK_END)
        unwritten = memoryview(fresh_line + line)
        try:
            while unwritten:
                unwritten = unwritten[handle.write(unwritten):]
            os.fsync(handle.fileno())
        except OSError:
            handle.truncate(size)
            raise


def _write_file(path: Path, data: bytes) -> None:
    """Write a new file, flushed to disk."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def append_record(results_dir: str | Path, record: Record, samples: Sequence[dict[str, Any]] = ()) -> None:
    """Store a run: its samples log (the lines `samples`) where the record names one, then the
    record. A record that would not read back valid (a plugin's metrics of the wrong shape), or
    a write that fails (a full disk), leaves the store as it was: RunError."""
    stored = json.dumps(record.to_dict(), sort_keys=True) + "\n"
    try:
        Record.from_dict(json.loads(stored))
    except InvalidRecord as error:
        raise RunError(f"the run's record is not valid ({error}); nothing was stored") from None
    records, log = store_file(results_dir, RECORDS_FILE), None
    try:
        records.parent.mkdir(parents=True, exist_ok=True)
        if record.samples is not None:
            log = store_file(results_dir, record.samples)
            log.parent.mkdir(parents=True, exist_ok=True)
            _write_file(log, "".join(json.dumps(line) + "\n" for line in samples).encode("utf-8"))
        _append_line(records, stored.encode("utf-8"))
    except OSError as error:
        if log is not None:
            log.unlink(missing_ok=True)
        raise RunError(f"the record could not be stored in {results_dir} ({error.strerror}); the "
                       "finished examples are kept: run the same command again to store it") from None


def read_records(results_dir: str | Path) -> list[Record]:
    """Every stored record, oldest first, migrated to the current schema; a line that is not
    JSON, or not a valid record, is skipped and named on stderr with the reason."""
    path = store_file(results_dir, RECORDS_FILE)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line.strip():
            try:
                records.append(Record.from_dict(json.loads(line)))
            except InvalidRecord as error:
                print(f"{path}, line {number}: skipped, not a record: {error}", file=sys.stderr)
            except ValueError:  # not JSON, or not even UTF-8
                print(f"{path}, line {number}: skipped, not a JSON record", file=sys.stderr)
    return records


def find_record(results_dir: str | Path, reference: str) -> Record:
    """The record whose id is `reference`, or the only one whose id starts with it, or with
    `latest` the newest record; a UsageError names what went wrong."""
    records = read_records(results_dir)
    if reference == "latest":
        found = records[-1:]
    else:
        found = ([r for r in records if r.id == reference]
                 or [r for r in records if r.id.startswith(reference)])
    if not found:
        raise UsageError(f"no record '{reference}' in {Path(results_dir) / RECORDS_FILE}")
    if len(found) > 1:
        ids = ", ".join(r.id for r in found[:5])
        raise UsageError(f"'{reference}' is the start of {len(found)} record ids ({ids}"
                         f"{', ...' if len(found) > 5 else ''}); give more of the id")
    return found[0]


def read_samples(results_dir: str | Path, record: Record) -> list[dict[str, Any]]:
    """The lines of a record's samples log (plain or gzipped), one per example, in the run's
    order."""
    if record.samples is None:
        raise UsageError(f"record {record.id} has no samples log (it was run before raghub wrote them)")
    try:
        path = store_file(results_dir, record.samples)
    except UsageError as error:
        raise UsageError(f"record {record.id}: {error}") from None
    if not path.is_file():
        raise UsageError(f"the samples log of record {record.id}, {path}, is missing")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, EOFError, ValueError) as error:  # not gzip, cut short, not JSON or UTF-8
        raise UsageError(f"the samples log of record {record.id}, {path}, is damaged ({error})") from None
