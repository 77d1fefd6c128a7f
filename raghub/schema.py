"""A small declarative schema for task YAMLs: each key's type, whether it is required, and the
keys of nested sections, so a misspelled or missing key is one line naming the file and key."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from raghub.errors import UsageError
from raghub.options import Option

_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping"}


@dataclass(frozen=True)
class Field:
    """One key: `kind` is a type, a tuple of allowed strings, or a nested schema (a dict of
    Fields, for a mapping section); a number may be bounded below by `at_least` (and a float
    must be finite), checked as an `Option`'s bounds are."""

    kind: Any
    required: bool = False
    at_least: float | None = None

    def check(self, value: Any, where: str, key: str) -> None:
        if isinstance(self.kind, dict):
            if not isinstance(value, dict):
                raise UsageError(f"{where}: '{key}' must be a mapping, not {value!r}")
            check_schema(value, self.kind, where, f"{key}.")
        elif isinstance(self.kind, tuple):
            if value not in self.kind:
                raise UsageError(f"{where}: '{key}' must be one of {', '.join(self.kind)}, not {value!r}")
        elif (isinstance(value, bool) and self.kind is not bool) or not isinstance(
                value, (int, float) if self.kind is float else self.kind):
            raise UsageError(f"{where}: '{key}' must be {_TYPE_WORDS.get(self.kind, self.kind)}, not {value!r}")
        elif self.kind in (int, float):
            Option(self.kind, None, "", at_least=self.at_least).convert(key, value, f"{where}: '{key}'")


def check_schema(mapping: dict[str, Any], schema: dict[str, Field], where: str, prefix: str = "") -> None:
    """Every key of `mapping` known to `schema`, every required one present, each of its type."""
    for key, value in mapping.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UsageError(f"{where}: unknown key '{prefix}{key}'{hint}")
        schema[key].check(value, where, prefix + key)
    for key, spec in schema.items():
        if spec.required and key not in mapping:
            raise UsageError(f"{where}: the required key '{prefix}{key}' is missing")
