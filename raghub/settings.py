"""The core settings of a run, declared like plugin options, and reading YAML files (task
definitions, `--config` files) and task data files with errors a user can act on."""

from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator

from raghub.errors import UsageError
from raghub.options import Option

#: every setting of `raghub run` that is raghub's own (plugins add theirs)
CORE_OPTIONS: dict[str, Option] = {
    "task": Option(str, None, "Task name (see `raghub tasks`) or a task YAML file; a comma list runs each."),
    "method": Option(str, None, "Method name (see `raghub methods`); a comma list runs each."),
    "retriever": Option(str, None, "Retriever name (see `raghub retrievers`; default: the task's, else bm25); "
                                   "names joined by + (bm25+dense) fuse their rankings by reciprocal rank fusion."),
    "reranker": Option(str, None, "Reranker (see `raghub rerankers`): reorders the top --rerank-depth passages and "
                                  "keeps the best --n-docs."),
    "rerank_depth": Option(int, None, "Passages each retriever fetches for the reranker or the fusion (default: "
                                      "4 x --n-docs).", at_least=1),
    "fusion_k": Option(int, None, "Reciprocal rank fusion's k for a +-joined --retriever (default: 60).", at_least=1),
    "refiner": Option(str, None, "Refiner (see `raghub refiners`): shortens the passages a method reads."),
    "n_docs": Option(int, None, "Passages retrieved per example (default: the task's, else 4); a comma "
                                "list runs each (0 only for methods that retrieve nothing).", at_least=0),
    "model": Option(str, None, "Hub id, model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)."),
    "model_backend": Option(str, None, "Model backend (see `raghub models`; default: the first that loads --model)."),
    "model_args": Option(str, "", "Backend options as key=value,... (see `raghub models`)."),
    "limit": Option(int, None, "Evaluate only the first N examples.", at_least=1),
    "results_dir": Option(str, "results", "Results store."),
    "data_dir": Option(str, None, "Local datasets folder [env: RAGHUB_DATA_DIR; default: ../shared/data "
                                  "beside the checkout when it exists, else the hub]."),
    "batch_size": Option(int, 8, "Examples per batch.", at_least=1),
    "device": Option(str, None, "torch device (default: cuda if available, else cpu)."),
    "dtype": Option(("auto", "float32", "bfloat16", "float16"), "auto",
                    "Weights' dtype; auto: bfloat16 where the hardware computes it natively, else float32."),
}
#: names no plugin option may take: the core settings and the CLI's own flags
RESERVED_NAMES = frozenset({*CORE_OPTIONS, "config", "json", "force", "verbose"})


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file; UsageError naming the file (and line) otherwise."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
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


#: the package whose YAML files hold raghub's shared task defaults (`_qa.yaml`, `_wikitext.yaml`)
BUILT_IN_TASKS = "raghub.tasks"


def read_task_definition(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task YAML file. `include: FILE` (or a list) names YAML files whose keys are defaults
    that this file's own keys override: beside it, else raghub's shared defaults of that name
    (so a plugin's YAML may `include: _qa.yaml`); `source` records where it came from."""
    path = Path(path)
    own = read_yaml_mapping(path)
    included = own.pop("include", [])
    merged: dict[str, Any] = {}
    for name in included if isinstance(included, list) else [included]:
        if not isinstance(name, str):
            raise UsageError(f"{path}: 'include' must name YAML files, not {name!r}")
        target = path.parent / name
        if not target.is_file():
            target = Path(str(files(BUILT_IN_TASKS))) / name
        if not target.is_file():
            raise UsageError(f"{path}: 'include' names {name}, but there is no file {path.parent / name} "
                             "nor a built-in one")
        if target.resolve() in (*_including, path.resolve()):
            raise UsageError(f"{path}: 'include' of {name} is circular")
        defaults = read_task_definition(target, (*_including, path.resolve()))
        merged.update({k: v for k, v in defaults.items() if k != "source"})
    return {**merged, **own, "source": str(path)}


def parse_key_values(text: str, flag: str) -> dict[str, str]:
    """`key=value,key=value` (lm-eval's --model_args) as a dict; UsageError on a bad pair."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise UsageError(f"{flag} takes key=value pairs separated by commas, not {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


# --------------------------------------------------------------------------- task data files


def data_path(data_dir: str | Path, *parts: str, source: str, inside: str = "the data directory") -> Path:
    """`data_dir / parts...`; UsageError naming `source` (the task file) when `..` or an
    absolute part leads outside the data directory (`inside` names it). Symbolic links inside
    it are followed, so a large dataset may be linked in."""
    root = os.path.abspath(data_dir)
    if not Path(os.path.abspath(os.path.join(root, *parts))).is_relative_to(root):
        raise UsageError(f"{source}: the data path {Path(*parts)} leads outside {inside} "
                         f"{data_dir}; give a folder and file names inside it")
    return Path(data_dir, *parts)


def package_folder(package: str, source: str) -> Path:
    """The folder of the installed Python package `package` (a plugin shipping its data);
    UsageError naming `source` when it is not an importable package."""
    try:
        return Path(str(files(package)))
    except (ImportError, TypeError) as error:
        raise UsageError(f"{source}: data.package names {package}, which is not an installed Python "
                         f"package ({type(error).__name__}: {error})") from None


def data_file(data: dict[str, Any], key: str, data_dir: str | Path | None, source: str) -> Path:
    """The file that a task YAML's `data[key]` names: inside the Python package `data.package`
    when it names one (a plugin's own data), under `data.folder` of the data directory when it
    names that (never outside either), else the path it gives, relative to the folder of the
    YAML file `source`."""
    name = data[key]
    if "package" in data and "folder" in data:
        raise UsageError(f"{source}: data names both a package and a folder; give one")
    if "package" in data:
        package = data["package"]
        return data_path(package_folder(package, source), name, source=source, inside=f"the package {package}")
    if "folder" in data:
        return data_path(data_dir, data["folder"], name, source=source)
    if not (Path(name).is_absolute() or Path(source).is_file()):
        raise UsageError(f"{source}: data.{key} {name} is a relative path and the definition comes from "
                         "no file; give data.folder (a folder of the data directory), data.package (the "
                         "Python package shipping it) or an absolute path")
    return Path(source).parent / name


def data_is_local(data: dict[str, Any]) -> bool:
    """Whether a task YAML's `data` names its files wherever the data directory is (a package's
    files, or paths of their own), so that they are read even when the hub is the data source."""
    return "folder" not in data


def _not_utf8(path: Path) -> UsageError:
    return UsageError(f"{path} is not UTF-8 text; convert it to UTF-8 or fetch it again")


def _empty(path: Path) -> UsageError:
    return UsageError(f"{path} is empty; fetch it again")


def _not_json(path: Path, line: int, problem: str) -> UsageError:
    return UsageError(f"{path}, line {line}: not JSON ({problem}); the file may be truncated: "
                      "fetch it again")


def read_data_text(path: Path) -> str:
    """A data file's text; UsageError naming it when it is not UTF-8 or holds only blanks."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not text.strip():
        raise _empty(path)
    return text


def read_data_json(path: Path) -> Any:
    """A data file's JSON value; UsageError naming the file and line when it is not JSON."""
    try:
        return json.loads(read_data_text(path))
    except json.JSONDecodeError as error:
        raise _not_json(path, error.lineno, error.msg) from None


def read_data_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line of a JSONL data file, read line by line;
    UsageError naming the file (and line) when one is not JSON, the file is not UTF-8, or it
    holds no lines."""
    empty = True
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    empty = False
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise _not_json(path, number, error.msg) from None
                    yield number, value
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if empty:
        raise _empty(path)
