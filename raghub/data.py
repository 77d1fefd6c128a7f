"""Where task data comes from: the local data folder (`RAGHUB_DATA_DIR`, else `../shared/data`
beside the checkout) or, without one, the Hugging Face hub, whose failures become one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raghub.errors import UsageError


def default_data_dir() -> str | None:
    """`shared/data` in the folder above the repository holding the raghub package, when it
    exists; None (read the hub) otherwise."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(folder) if folder.is_dir() else None


def load_hub_dataset(task_name: str, path: str, name: str | None, split: str) -> Any:
    """`datasets.load_dataset(path, name, split=split)`; a UsageError saying what to do when the
    hub cannot provide it (offline, unknown dataset, failed download)."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except (OSError, datasets.exceptions.DatasetsError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"task {task_name}: the hub could not provide {path} ({name or 'default'}, "
                         f"{split}): {reason}; set RAGHUB_DATA_DIR (or --data-dir) to a folder holding "
                         "the task's files, or check your network") from error
