"""The errors raghub reports as one line instead of a traceback.

`UsageError`: the user's input is wrong (exit code 2, nothing written). `RunError`: the input
was fine but the run could not finish (a lost peer process, ...): exit code 1, and the examples
finished so far are kept for a rerun to resume.
"""

from typing import Any


class RaghubError(Exception):
    """Base of the errors the CLI prints as one line."""

    exit_code = 1


class UsageError(RaghubError):
    """Bad input from the user: one line, exit code 2, nothing written."""

    exit_code = 2


class RunError(RaghubError):
    """A run that started well could not finish: one line, exit code 1."""


class ReturnedWrong(RunError):
    """A plugin returned what its contract forbids: the contract checks raise it, naming the
    plugin as `kind` and saying `what` it returned; the runner adds where the plugin came from."""

    def __init__(self, kind: str, plugin: Any, what: str) -> None:
        super().__init__(f"{kind} '{plugin.name}' returned {what}")
        self.plugin, self.what = plugin, what


def amount(count: int, noun: str, plural: str = "") -> str:
    """'1 answer', '2 answers' (`plural` when adding an s is wrong): a count in a message."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
