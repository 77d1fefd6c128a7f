"""Registers every task definition YAML shipped in the `tasks/` folder (`raghub.tasks`)."""

from __future__ import annotations

from importlib.resources import files

from raghub.config import read_task_definition
from raghub.hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    for entry in sorted(files("raghub.tasks").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            register(read_task_definition(str(entry)))
