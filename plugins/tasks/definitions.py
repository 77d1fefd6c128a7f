"""Registers every task definition YAML shipped in the `tasks/` folder (`raghub.tasks`); files
whose names start with `_` hold shared defaults that task files `include:`."""

from __future__ import annotations

from importlib.resources import files

from raghub import hookimpl, read_task_definition


@hookimpl
def register_tasks(register):
    for entry in sorted(files("raghub.tasks").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml") and not entry.name.startswith("_"):
            register(read_task_definition(str(entry)))
