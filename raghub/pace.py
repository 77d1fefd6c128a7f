"""How long a run's remaining examples will take, at the pace of those it has run so far (not
of examples a resumed run found done), in words a person reads."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """'2 h 05 min', '3 min 20 s', '12 s', '0.4 s'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class Pace:
    """The examples this process runs (`total`), those run so far (`done`, which counts a batch
    partly run by the share of its work finished), and the time they took."""

    def __init__(self, total: int):
        self.total = total
        self.done: float = 0
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> str:
        """The time the examples not yet run will take at the pace so far ('?' before any ran)."""
        if not self.done:
            return "?"
        return duration(self.elapsed / self.done * (self.total - self.done))
