"""The result record of one run, versioned: `Record.from_dict` is the one reader of a stored
record. It migrates a record of an older schema to the current one and checks every field's
type (and the nested values the leaderboard reads), so that a damaged or hand-edited record is
refused with a reason instead of breaking a reader later.

Schema 1 (no `schema_version`): records written before ids, samples logs, standard errors and
plugin origins existed lack those fields, and `config.task.config.source` holds the absolute
path of the task's YAML on the machine that ran it. Schema 2 gives such a record an id (its
start time and a hash of its content, the same on every read), fills the missing fields with
their empty values, and drops that path: where a YAML lay is no part of what ran.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, Union

from raghub.cache import fingerprint

SCHEMA_VERSION = 2
#: nested values that readers rely on, by their path in the record (checked where present)
NESTED = {("config", "task"): dict[str, Any], ("config", "task", "config"): dict[str, Any],
          ("config", "corpus"): dict[str, Any], ("metrics", "by_type"): dict[str, dict[str, Any]],
          ("hardware", "dtype"): str | None}


class InvalidRecord(ValueError):
    """A stored value that is not a record this raghub can read; the message says why."""


@dataclass(frozen=True)
class Record:
    """One finished run, as the results store keeps it (README: "The result record")."""

    id: str
    task: str
    method: str
    n_examples: int
    metrics: dict[str, Any]
    samples: str | None = None  # the samples log, relative to the results folder
    family: str | None = None
    task_version: int = 1
    retriever: str | None = None
    model: str | None = None
    n_docs: int = 0
    settings: str = ""
    corpus: str | None = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    method_stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, str | None] = field(default_factory=dict)
    raghub_version: str | None = None
    git_commit: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The record as stored: a JSON object."""
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> "Record":
        """The record a stored JSON value holds, migrated to the current schema; InvalidRecord
        when it is not one."""
        if not isinstance(value, dict):
            raise InvalidRecord(f"a record is a JSON object, not {type(value).__name__}")
        version = value.get("schema_version", 1)
        if not (type(version) is int and 1 <= version <= SCHEMA_VERSION):
            raise InvalidRecord(f"schema_version {version!r} is not one this raghub reads "
                                f"(1 to {SCHEMA_VERSION}; a newer raghub wrote it?)")
        if version == 1:
            value = _from_schema_1(value)
        for name in REQUIRED:
            if name not in value:
                raise InvalidRecord(f"'{name}' is missing")
        for name, item in value.items():
            if name not in FIELD_TYPES:
                raise InvalidRecord(f"'{name}' is not a field of a record")
            _check(item, FIELD_TYPES[name], name)
        for path, hint in NESTED.items():
            item = _nested(value, path)
            if item is not MISSING:
                _check(item, hint, ".".join(path))
        return cls(**value)


FIELD_TYPES = typing.get_type_hints(Record)
REQUIRED = [f.name for f in fields(Record) if f.default is MISSING and f.default_factory is MISSING]


def _nested(value: Any, path: tuple[str, ...]) -> Any:
    """The value at `path` inside nested mappings, or MISSING where the path ends early."""
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the annotated type (str, int, float, bool, None, Any,
    dict[K, V] and unions of these)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, option) for option in typing.get_args(hint))
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        return isinstance(value, dict) and all(_conforms(k, key_type) and _conforms(v, value_type)
                                               for k, v in value.items())
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _check(value: Any, hint: Any, name: str) -> None:
    if not _conforms(value, hint):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        raise InvalidRecord(f"'{name}' must be {expected}, not {shown}")


def _from_schema_1(value: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record as schema 2 (see the module's docstring)."""
    migrated = {**value, "schema_version": SCHEMA_VERSION}
    definition = _nested(value, ("config", "task", "config"))
    if isinstance(definition, dict):
        config, task = value["config"], value["config"]["task"]
        definition = {key: item for key, item in definition.items() if key != "source"}
        migrated["config"] = {**config, "task": {**task, "config": definition}}
        migrated.setdefault("task_version", definition.get("version", 1))
    if "id" not in value:
        try:
            started = f"{datetime.fromisoformat(value['started_at']):%Y%m%d-%H%M%S}"
        except (KeyError, TypeError, ValueError):
            started = "undated"
        migrated["id"] = f"{started}-{fingerprint(value)[:6]}"
    return migrated
