"""The task YAML reference (`raghub task-yaml`, kept as docs/task-yaml.md), written from the
schemas that task definitions are checked against (`COMMON_TASK_KEYS` and each family's
`definition_schema`) and from raghub's shared defaults, so that it cannot drift from them."""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from raghub.interfaces import COMMON_TASK_KEYS, Task
from raghub.schema import Field, reference_rows, type_words
from raghub.settings import BUILT_IN_TASKS

INTRO = """\
# Task YAML reference

Written by `raghub task-yaml` from the schemas raghub checks task files against; do not edit
(a test regenerates it and compares).

A task is a YAML file, given to `--task path.yaml` or registered by a plugin
(`register_tasks`). `include: FILE` (or a list of files) takes FILE's keys as defaults that the
file's own keys override; FILE is looked for beside the including file, then among raghub's
shared defaults below. A misspelled, missing or mistyped key is one line naming the file and key.
A key left out gets its default."""


def _shown(value: Any) -> str:
    """A default as the reference shows it (as YAML would write it); '' when there is none."""
    if value is None:
        return ""
    return f"`{value}`" if isinstance(value, (str, int, float)) else f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def schema_table(schema: dict[str, Field]) -> list[str]:
    """A Markdown table of every key of `schema` (a section's keys dotted after it)."""
    lines = ["| key | value | required | default | meaning |", "|---|---|---|---|---|"]
    for key, field in reference_rows(schema):
        lines.append(f"| `{key}` | {_cell(type_words(field))} | {'yes' if field.required else ''} | "
                     f"{_shown(field.default)} | {_cell(field.help)} |")
    for key, field in reference_rows(schema):
        if field.choices:
            lines += ["", f"`{key}`:", ""]
            lines += [f"- `{name}`: {' '.join(meaning.split())}" for name, meaning in field.choices.items()]
    return lines


def shared_defaults() -> list[str]:
    """Each of raghub's shared default files (`_NAME.yaml`) as it is."""
    lines = ["## Shared defaults", ""]
    for entry in sorted(files(BUILT_IN_TASKS).iterdir(), key=lambda e: e.name):
        if entry.name.startswith("_") and entry.name.endswith(".yaml"):
            lines += [f"`include: {entry.name}`:", "", "```yaml", entry.read_text(encoding="utf-8").rstrip(),
                      "```", ""]
    return lines


def task_yaml_reference(families: dict[str, type[Task]]) -> str:
    """The reference page: the keys every task has, each family's keys, the shared defaults."""
    lines = [INTRO, "", "## Every family", "", *schema_table(COMMON_TASK_KEYS), ""]
    for name, family in sorted(families.items()):
        lines += [f"## Family `{name}`", "", f"{family.description}.", "", *schema_table(family.definition_schema), ""]
    return "\n".join([*lines, *shared_defaults()]).rstrip() + "\n"
