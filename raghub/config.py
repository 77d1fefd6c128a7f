"""Reading YAML files (task definitions, `--config` files) with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raghub.interfaces import UsageError


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file; UsageError naming the file (and line) otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"malformed YAML in {where}: {problem}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of settings, not a {type(data).__name__}")
    return data


def check_task_definition(definition: dict[str, Any], origin: str) -> dict[str, Any]:
    """A task definition must name itself and its family."""
    missing = [key for key in ("name", "family") if key not in definition]
    if missing:
        raise UsageError(f"task definition from {origin} lacks {', '.join(missing)}")
    return definition


def read_task_definition(path: str | Path) -> dict[str, Any]:
    """A task YAML file; `source` records where it came from."""
    return check_task_definition({**read_yaml_mapping(path), "source": str(path)}, str(path))
