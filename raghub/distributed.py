"""Sharded evaluation over the ranks that a launcher started (`torchrun`, `accelerate launch`).

raghub spawns no processes: the launcher starts one per rank and says so in the environment
(WORLD_SIZE, RANK, LOCAL_RANK). torch.distributed (gloo on CPU, nccl on GPU) is used only for
barriers, and only imported when WORLD_SIZE > 1, so a single process never imports torch here.

The resume state is per example, not per rank: each rank appends its sample lines to its own
`<fingerprint>.rank<r>.jsonl` beside the shared `<fingerprint>.jsonl`, and every run, whatever
its number of ranks, reads them all. Rank 0 merges them into the record and deletes them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@functools.lru_cache(maxsize=None)
def ranks(backend: str | None = None) -> Ranks:
    """The ranks from the launcher's environment, joining the process group when there are
    several (the first call joins; later ones only read); a plain process is rank 0 of 1.
    `backend` names the process group's backend; by default nccl beside a GPU, else gloo (a
    job that runs on the CPU whatever the machine, like training, asks for gloo)."""
    found = Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)))
    if found.world_size > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(found.local_rank)
            dist.init_process_group(backend)
    return found


def notice(message: str) -> None:
    """Tell the user something on stderr, once: from rank 0 only under a launcher."""
    if ranks().is_main:
        print(f"raghub: {message}", file=sys.stderr)


def console() -> Console:
    """A console on stderr for progress bars and status lines, silent on every rank but rank 0."""
    from rich.console import Console

    return Console(stderr=True, quiet=not ranks().is_main)


def barrier() -> None:
    """Wait until every rank gets here (nothing for a single process)."""
    if ranks().world_size > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (building cache entries); the others wait, then run it
    (reading those entries)."""
    if not ranks().is_main:
        barrier()
    yield
    if ranks().is_main:
        barrier()


def mean_over_ranks(value) -> float:
    """The mean of a scalar tensor over the ranks (its own value in a single process)."""
    here = ranks()
    if here.world_size > 1:
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        value /= here.world_size
    return float(value.detach())


def device(requested: str | None) -> str | None:
    """The device for this rank: cuda:LOCAL_RANK when several ranks share a machine with GPUs
    and no particular GPU was asked for; else what was asked."""
    here = ranks()
    if here.world_size == 1 or requested not in (None, "cuda"):
        return requested
    import torch

    return f"cuda:{here.local_rank}" if torch.cuda.is_available() else requested


def my_batches(todo: Sequence[T], batch_size: int) -> list[list[T]]:
    """This rank's batches of `todo`: the single-process batches, dealt round-robin, so that
    every example is batched as it would be in one process."""
    here = ranks()
    batches = [list(todo[first : first + batch_size]) for first in range(0, len(todo), batch_size)]
    return batches[here.rank :: here.world_size]


def resume_files(resume_path: Path) -> list[Path]:
    """The shared resume file and every rank's, whichever number of ranks wrote them."""
    return [resume_path, *sorted(resume_path.parent.glob(f"{resume_path.stem}.rank*.jsonl"))]


def my_resume_file(resume_path: Path) -> Path:
    """Where this rank appends: the shared file for a single process, else its own."""
    here = ranks()
    return resume_path if here.world_size == 1 else resume_path.with_name(f"{resume_path.stem}.rank{here.rank}.jsonl")
