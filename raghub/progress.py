"""What a running evaluation shows a person: a bar of the examples finished that moves within a
batch as the model finishes its work, the time left at the pace so far (`Pace`), and, for the
headline command, the examples to run and the time the first batch says to expect.

A model backend tells the bar about each call it works on through `ModelProgress`. While every
batch so far made one reported call (a task scored in one batched call, whatever the method
puts in it), the bar advances within a batch by the share of that call's items finished: a
batch of 8 examples whose call scores 40 sequences advances 8/40 per sequence. A batch that
makes more calls (a method that reads and writes in turns) cannot know its share ahead: the
bar's text then counts the model's work ("batch 3/13 · call 2 · 24 of 40 sequences") and the
bar advances when the batch finishes (the first such batch holds the bar where its first call
left it).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from raghub import distributed
from raghub.distributed import notice
from raghub.pace import Pace, duration

#: the run whose batch the model works on now; None outside a batch (nothing listens)
_listening: RunProgress | None = None
#: held while a report changes the bar: a backend may report from several threads at once
_reports = threading.Lock()


class ModelProgress:
    """A model backend's report of one call as it works: the call's `items` (the sequences it
    scores, the prompts it continues) when it starts, then `advance` as parts of them finish
    (from any thread). Only reports: how the call batches its work stays as it is. Outside a
    run's batch nobody listens, and reports are dropped."""

    def __init__(self, items: int):
        self.run = _listening
        if self.run is not None:
            with _reports:
                self.run.call_started(items)

    def advance(self, items: int) -> None:
        if self.run is not None:
            with _reports:
                self.run.items_finished(items)


class RunProgress:
    """The bar of this rank's share of a run: `found` examples a resumed run found finished,
    then `batches`, the sizes of the batches it runs, one `batch` at a time."""

    def __init__(self, bar: Progress, label: str, found: int, batches: Sequence[int], announce: bool):
        self.bar, self.found, self.batches, self.announce = bar, found, batches, announce
        self.pace = Pace(sum(batches))
        self.task = bar.add_task(label, total=found + self.pace.total, completed=found, remaining="?", work="")
        #: whether each batch so far made at most one reported model call: only then does a
        #: call's share of its items tell the batch's
        self.one_call_batches = True
        self.number = self.start = self.calls = self.items = self.finished = 0

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The next batch, its model's work reported to the bar while it runs; the bar reaches
        the batch's end when the block finishes."""
        global _listening
        self.number += 1
        self.start, self.calls, self.items, self.finished = self.pace.done, 0, 0, 0
        self._show()
        _listening = self
        try:
            yield
        finally:
            _listening = None
        self.one_call_batches &= self.calls <= 1
        self._move_to(self.start + self.batches[self.number - 1])
        self._show()
        if self.announce and self.number == 1 and self.pace.done < self.pace.total:
            notice(f"the first batch of {self.pace.done} took {duration(self.pace.elapsed)}: expect about "
                   f"{self.pace.remaining()} more for the other {self.pace.total - self.pace.done}")

    def call_started(self, items: int) -> None:
        self.calls += 1
        self.items, self.finished = items, 0
        self._show()

    def items_finished(self, items: int) -> None:
        self.finished += items
        if self.one_call_batches and self.calls == 1 and self.items:
            self._move_to(self.start + self.batches[self.number - 1] * min(self.finished / self.items, 1.0))
        self._show()

    def _move_to(self, done: float) -> None:
        """The examples run so far (part of a batch counted by its share); the time left with them."""
        self.pace.done = done
        self.bar.update(self.task, completed=self.found + done, remaining=self.pace.remaining())

    def _show(self) -> None:
        """The bar's text: the batch, and the model's work in it so far."""
        work = f"batch {self.number}/{len(self.batches)}"
        if self.calls > 1:
            work += f" · call {self.calls}"
        if self.calls:
            work += f" · {self.finished} of {self.items} sequences"
        self.bar.update(self.task, work=work)


@contextmanager
def run_progress(label: str, found: int, batches: Sequence[int], batch_size: int,
                 announce: bool = False) -> Iterator[RunProgress]:
    """The bar of a run's `found` finished examples and the `batches` (sizes, of up to
    `batch_size`) this rank runs, on stderr of rank 0 only. `announce`: say up front how many
    examples will run, and after the first batch the time the rest will take."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[remaining]} left"), TextColumn("{task.fields[work]}"))
    with Progress(*columns, console=distributed.console()) as bar:
        run = RunProgress(bar, label, found, batches, announce)
        if announce and batches:
            notice(f"{label}: {run.pace.total} examples to run, in {len(batches)} batch(es) of up to {batch_size}; "
                   "the first batch gives the time to expect")
        yield run
