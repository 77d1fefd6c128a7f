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
    must be finite), checked as an `Option`'s bounds are. `help` says what it means, `default`
    is the value a YAML without it gets, and `choices` what each allowed string means: the task
    YAML reference (`raghub task-yaml`) is written from them."""

    kind: Any
    required: bool = False
    at_least: float | None = None
    help: str = ""
    default: Any = None
    choices: dict[str, str] | None = None

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


def type_words(field: Field) -> str:
    """What a key's value must be, in words: "an integer (at least 1)", "one of squad, cwq"."""
    if isinstance(field.kind, dict):
        return "a mapping"
    if isinstance(field.kind, tuple):
        return "one of " + ", ".join(f"`{value}`" for value in field.kind)
    bound = f" (at least {field.at_least:g})" if field.at_least is not None else ""
    return _TYPE_WORDS.get(field.kind, str(field.kind)) + bound


def reference_rows(schema: dict[str, Field], prefix: str = "") -> list[tuple[str, Field]]:
    """(dotted key, Field) of every key of `schema`, a section's keys after the section's own."""
    rows = []
    for key, field in schema.items():
        rows.append((prefix + key, field))
        if isinstance(field.kind, dict):
            rows += reference_rows(field.kind, f"{prefix}{key}.")
    return rows
