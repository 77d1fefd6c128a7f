"""The resume file of a run: each example's line of the samples log is appended to it as its
batch finishes, one checksummed line per batch, so that an interrupted run, started again with
the same settings, continues where it stopped and computes again any batch whose line is
damaged. Under a launcher each rank appends to a file of its own.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from raghub import distributed
from raghub.cache import fingerprint
from raghub.distributed import notice
from raghub.errors import ReturnedWrong, amount
from raghub.interfaces import Example, Method, Retrieved, Task
from raghub.progress import run_progress
from raghub.provenance import sample_line


def _checksum(batch: dict[str, Any]) -> str:
    """The checksum of a batch in a resume file, over its JSON escaped to ASCII (so that any
    text, a lone surrogate included, can be hashed); reading keeps the order of keys."""
    return fingerprint(json.dumps(batch))


def _checked_ids(task: Task, examples: Sequence[Example]) -> None:
    """A RunError naming the task family's plugin when two examples share an id (their lines are
    kept, resumed and paired by id)."""
    repeated = [(example_id, n) for example_id, n in Counter(e.id for e in examples).items() if n > 1]
    if repeated:
        example_id, n = repeated[0]
        raise ReturnedWrong("task family", task, f"{n} examples with the id {example_id!r}; each example needs "
                                                 "an id of its own")


def _checked_stats(task: Task, examples: Sequence[Example], results: Any) -> list[dict[str, Any]]:
    """What `task.evaluate` returned for a batch: one JSON-able stats dict per example, else a
    RunError naming the task family's plugin."""
    if not isinstance(results, (list, tuple)) or len(results) != len(examples):
        returned = amount(len(results), "stats dict") if isinstance(results, (list, tuple)) else repr(results)
        raise ReturnedWrong("task family", task, f"{returned} for {amount(len(examples), 'example')}")
    for example, stats in zip(examples, results):
        if not isinstance(stats, dict):
            raise ReturnedWrong("task family", task, f"{stats!r} for example {example.id}; it must return one dict of stats "
                                       "per example")
        try:
            json.dumps(stats)
        except (TypeError, ValueError) as error:
            raise ReturnedWrong("task family", task, f"stats for example {example.id} that are not JSON: {error}") from None
    return list(results)


def _batch_line(lines: list[dict[str, Any]], counters: dict[str, int]) -> str:
    """A finished batch's line in a resume file: its sample lines, the method counters it
    added, and the checksum of both."""
    batch = {"lines": lines, "counters": counters}
    return json.dumps({**batch, "checksum": _checksum(batch)}) + "\n"


def _verified_batch(line: bytes) -> dict[str, Any] | None:
    """The batch a resume file's line holds, None when it is damaged (torn, not UTF-8 or not
    JSON, edited: its checksum fails) or an older raghub's."""
    try:
        entry = json.loads(line)
        batch = {"lines": entry["lines"], "counters": entry["counters"]}
        return batch if entry["checksum"] == _checksum(batch) else None
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        return None


def _read_resume_file(path: Path, report: bool = True) -> tuple[dict[str, dict[str, Any]], Counter[str]]:
    """The sample lines of the examples finished so far, by example id, from the shared resume
    file and every rank's, and the method counters of their batches. A damaged batch is
    dropped (named on stderr when `report`), so its examples are computed again."""
    done: dict[str, dict[str, Any]] = {}
    counters: Counter[str] = Counter()
    for file in distributed.resume_files(path):
        dropped = []
        for number, line in enumerate(file.read_bytes().split(b"\n") if file.exists() else (), start=1):
            if not line.strip():
                continue
            batch = _verified_batch(line)
            if batch is None:
                dropped.append(number)
                continue
            counters.update(batch["counters"])
            done.update((sample["id"], sample) for sample in batch["lines"])
        if dropped and report:
            notice(f"{file}: {len(dropped)} damaged batch{'es' * (len(dropped) > 1)} dropped (line "
                   f"{', '.join(map(str, dropped))}); those examples are computed again")
    return done, counters


def evaluate_resumably(task: Task, method: Method, examples: Sequence[Example],
                        retrieved: Sequence[Sequence[Retrieved]], resume_path: Path,
                        batch_size: int, announce: bool = False) -> dict[str, dict[str, Any]]:
    """Each example's sample line (which holds its stats), by example id, continuing from the
    resume files and appending to this rank's per batch; the method's counters become those
    of every batch in them. Under a launcher each rank runs its share of the batches, and the
    lines and counters are gathered from all ranks' files once every rank has finished.
    `announce`: say up front how many examples will run, and after the first batch the time
    the rest will take."""
    _checked_ids(task, examples)
    resume_path.parent.mkdir(parents=True, exist_ok=True)
    done, _ = _read_resume_file(resume_path)
    distributed.barrier()  # every rank has read the same state before any rank appends
    todo = [i for i, e in enumerate(examples) if e.id not in done]
    batches = distributed.my_batches(todo, batch_size)
    with run_progress(f"{task.name} · {method.name}", len(examples) - len(todo), list(map(len, batches)),
                      batch_size, announce) as progress, _append_to(distributed.my_resume_file(resume_path)) as resume:
        for batch in batches:
            with progress.batch():
                before = Counter(method.counters)
                results = task.evaluate(method, [examples[i] for i in batch], [retrieved[i] for i in batch])
                results = _checked_stats(task, [examples[i] for i in batch], results)
                added = {key: value - before[key] for key, value in method.counters.items() if value != before[key]}
                lines = [sample_line(task, examples[i], result, retrieved[i], method.work.take(examples[i].id))
                         for i, result in zip(batch, results)]
                resume.write(_batch_line(lines, added))  # the counters are kept exactly when the batch is
                resume.flush()
    distributed.barrier()  # every rank's lines are on disk
    done, counters = _read_resume_file(resume_path, report=False)  # damage was named by the first read
    method.counters.clear()
    method.counters.update(counters)
    return done


def _append_to(path: Path):
    """The resume file opened for appending, after a newline if a killed run tore its last line."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, 2)
            torn = handle.read(1) != b"\n"
    else:
        torn = False
    resume = open(path, "a", encoding="utf-8")
    if torn:
        resume.write("\n")
    return resume
