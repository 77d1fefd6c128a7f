"""Declared settings: every core setting and every plugin option is an `Option`, so a value from
the command line and one from a `--config` file are converted and bounded the same way."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from raghub.errors import UsageError

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def dashed(name: str) -> str:
    """An option name as the CLI spells it."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class Option:
    """A setting; the CLI exposes it as `--name` (underscores become dashes).

    `type` is a Python type (int, float, str, bool) or a tuple of allowed strings; a number can
    be bounded by `at_least`, `at_most` (inclusive) and `above` (exclusive), and any value
    checked by `check`. Values are checked when the run is resolved, before any model loads.
    """

    type: Any
    default: Any
    help: str
    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None
    #: a further check of a converted, non-empty value: what is wrong with it, or None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)

    def convert(self, name: str, value: Any, flag: str | None = None) -> Any:
        """`value` as this option's type (from the CLI or a config file), or a UsageError naming
        `flag` (default: `--name`)."""
        if value is None:
            return None
        flag = flag or f"--{dashed(name)}"
        converted = self._typed(flag, value)
        problem = self.check(converted) if self.check is not None and converted != "" else None
        if problem:
            raise UsageError(f"{flag} {problem}")
        return converted

    def _typed(self, flag: str, value: Any) -> Any:
        """`value` converted to `type` and within the bounds."""
        if isinstance(self.type, tuple):
            if value not in self.type:
                raise UsageError(f"{flag} must be one of {', '.join(self.type)}, not {value!r}")
            return value
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE + _FALSE:
                return str(value).lower() in _TRUE
            raise UsageError(f"{flag} must be true or false, not {value!r}")
        if self.type is str:
            if not isinstance(value, str):
                raise UsageError(f"{flag} must be a string, not {value!r}")
            return value
        converted = self._number(flag, value)
        for bound, fails, words in ((self.at_least, lambda b: converted < b, "at least"),
                                    (self.at_most, lambda b: converted > b, "at most"),
                                    (self.above, lambda b: converted <= b, "above")):
            if bound is not None and fails(bound):
                raise UsageError(f"{flag} must be {words} {bound:g}, not {converted}")
        return converted

    def _number(self, flag: str, value: Any) -> Any:
        """An int or float from a number or its text; a bool, a fractional int or a float that is
        not finite (NaN passes every bound, infinity is no setting) is refused."""
        wanted = "an int" if self.type is int else "a finite float"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"{flag} must be {wanted}, not {value!r}")
        try:
            converted = self.type(value)
        except (TypeError, ValueError, OverflowError):  # int(inf) overflows
            raise UsageError(f"{flag} must be {wanted}, not {value!r}") from None
        if not math.isfinite(converted) or (self.type is int and isinstance(value, float) and value != converted):
            raise UsageError(f"{flag} must be {wanted}, not {value!r}")
        return converted

    def same_meaning(self, other: "Option") -> bool:
        """Whether two plugins declaring this name mean the same setting (same type and default)."""
        return self.type == other.type and self.default == other.default
