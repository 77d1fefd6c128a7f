"""One run, from names to a stored record: resolve plugins, load, retrieve, evaluate, record.

Every input is validated before the model loads (`resolve`), so bad input fails fast and
writes nothing. Per-example stats are appended to a resume file as batches finish; an
interrupted run, started again with the same settings, continues where it stopped.
"""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import raghub
from raghub.cache import Cache, cache_root, fingerprint
from raghub.errors import UsageError
from raghub.interfaces import COMMON_TASK_KEYS, Example, Method, Plugin, Registry, Retrieved, Retriever, Task
from raghub.models import ModelBackend, choose_backend
from raghub.options import dashed
from raghub.plugin_manager import registry
from raghub.records import append_record
from raghub.schema import check_schema
from raghub.settings import CORE_OPTIONS, read_task_definition

DEFAULT_RETRIEVER = "bm25"
DEFAULT_N_DOCS = 4
stderr = Console(stderr=True)


@dataclass
class RunRequest:
    """What the user asked for, before anything is resolved: the core settings (converted by
    their declarations) and every other option, for the plugins."""

    task: str
    method: str
    retriever: str | None = None
    n_docs: int | None = None
    model: str | None = None
    model_backend: str | None = None
    model_args: str = ""
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    results_dir: Path = Path("results")
    data_dir: str | None = None
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "RunRequest":
        """A request from flat settings (flags and `--config` keys alike): core settings are
        converted and bounded by `CORE_OPTIONS`, the rest go to the plugins."""
        settings = dict(settings)
        core = {key: option.convert(key, settings.pop(key)) for key, option in CORE_OPTIONS.items()
                if settings.get(key) is not None}
        for required in ("task", "method"):
            if not core.get(required):
                raise UsageError(f"--{required} is required (on the command line or in --config)")
        return cls(**{**core, "results_dir": Path(core.get("results_dir", "results")),
                      "options": settings})


@dataclass
class ResolvedRun:
    """Plugin classes and validated settings, checked before the model is loaded."""

    request: RunRequest
    task: Task
    method_class: type[Method]
    retriever_class: type[Retriever] | None
    backend: ModelBackend
    n_docs: int
    plugin_options: dict[str, dict[str, Any]]

    def settings_label(self) -> str:
        """The options given that differ from their defaults, e.g. 'combine=True'."""
        parts = []
        for kind, cls in (("task", type(self.task)), ("method", self.method_class),
                          ("retriever", self.retriever_class)):
            for key, value in self.plugin_options.get(kind, {}).items():
                if cls is not None and value != cls.options[key].default:
                    parts.append(f"{key}={value}")
        return ", ".join(sorted(set(parts)))


def _unknown(kind: str, name: str, known: Sequence[str], command: str) -> UsageError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UsageError(f"unknown {kind} '{name}'; {hint}see `raghub {command}` "
                      f"(known: {', '.join(sorted(known))})")


def _split_options(given: dict[str, Any], plugins: dict[str, type[Plugin] | None]) -> dict[str, dict[str, Any]]:
    """Route each given option to every selected plugin that declares it; an option that two
    of them declare with different meanings (type or default) is refused."""
    routed: dict[str, dict[str, Any]] = {kind: {} for kind in plugins}
    label = {kind: f"{kind} '{getattr(cls, 'family', '') or cls.name}'" for kind, cls in plugins.items() if cls}
    for name, value in given.items():
        owners = [kind for kind, cls in plugins.items() if cls is not None and name in cls.options]
        if not owners:
            raise UsageError(f"--{dashed(name)} is not an option of the selected "
                             f"{', '.join(label.values())}; see `raghub run --help`")
        first = plugins[owners[0]].options[name]
        clash = [kind for kind in owners[1:] if not plugins[kind].options[name].same_meaning(first)]
        if clash:
            raise UsageError(f"--{dashed(name)} means different things to the {label[owners[0]]} and "
                             f"the {label[clash[0]]}; one of the two plugins must rename it")
        for kind in owners:
            if value is not None:  # `name: null` in a config file: the plugin's default
                routed[kind][name] = plugins[kind].options[name].convert(name, value)
    return routed


def _task_family(request: RunRequest, found: Registry) -> tuple[dict[str, Any], type[Task]]:
    """The task's definition, checked against its family's schema, and the family's class."""
    if request.task.endswith((".yaml", ".yml")) and Path(request.task).is_file():
        definition = read_task_definition(request.task)
    elif request.task in found.tasks:
        definition = found.tasks[request.task]
    else:
        raise _unknown("task", request.task, list(found.tasks), "tasks")
    # the two keys that choose the family's schema, checked before it is looked up
    check_schema({key: definition[key] for key in ("name", "family") if key in definition},
                 {key: COMMON_TASK_KEYS[key] for key in ("name", "family")},
                 definition.get("source", request.task))
    if definition["family"] not in found.task_families:
        raise UsageError(f"task '{definition['name']}' needs the task family "
                         f"'{definition['family']}', which no installed plugin provides")
    task_class = found.task_families[definition["family"]]
    task_class.check_definition(definition)
    return definition, task_class


def _warn(message: str) -> None:
    print(f"raghub: {message}", file=sys.stderr)


def resolve(request: RunRequest) -> ResolvedRun:
    """Look up and validate every name and option; raises UsageError on bad input."""
    found = registry()
    definition, task_class = _task_family(request, found)
    if request.method not in found.methods:
        raise _unknown("method", request.method, list(found.methods), "methods")
    method_class = found.methods[request.method]
    retriever_class = None
    n_docs = 0
    if method_class.needs_retrieval:
        retriever_name = request.retriever or definition.get("retriever", DEFAULT_RETRIEVER)
        if retriever_name not in found.retrievers:
            raise _unknown("retriever", retriever_name, list(found.retrievers), "retrievers")
        retriever_class = found.retrievers[retriever_name]
        n_docs = request.n_docs if request.n_docs is not None else definition.get("n_docs", DEFAULT_N_DOCS)
        if n_docs < 1:
            raise UsageError(f"--n-docs must be a positive integer for method '{request.method}', "
                             f"not {n_docs!r}")
    else:
        ignored = [f"--{flag}" for flag, value in (("retriever", request.retriever), ("n-docs", request.n_docs))
                   if value is not None]
        if ignored:
            _warn(f"{' and '.join(ignored)} ignored: method '{request.method}' retrieves nothing")
    options = _split_options(request.options, {"task": task_class, "method": method_class,
                                               "retriever": retriever_class})
    task = task_class(definition["name"], definition, request.data_dir, registry=found, **options["task"])
    task.check()
    backend = choose_backend(found, request.model, request.model_backend, request.model_args)
    if Path(request.results_dir).is_file():
        raise UsageError(f"--results-dir {request.results_dir} is a file, not a folder")
    return ResolvedRun(request, task, method_class, retriever_class, backend, n_docs, options)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=stderr)


def retrieve(task: Task, retriever: Retriever, examples: Sequence[Example], k: int,
             cache: Cache) -> tuple[list[list[Retrieved]], str, str]:
    """Top-k passages per example (none for an empty query), never from the example's own
    `exclude_group`; results are cached by corpus, retriever, queries and k.
    Returns (retrieved, corpus label, corpus fingerprint)."""
    passages, label = task.corpus()
    corpus_fp = fingerprint([(p.id, p.title, p.text, p.group) for p in passages])
    retriever.index(passages, corpus_fp)
    excluded = {e.exclude_group for e in examples if e.exclude_group}
    group_sizes: dict[str, int] = {}
    for passage in passages:
        if passage.group in excluded:
            group_sizes[passage.group] = group_sizes.get(passage.group, 0) + 1
    fetch = min(len(passages), k + max(group_sizes.values(), default=0))
    positions = [i for i, e in enumerate(examples) if e.query.strip()]

    def search() -> list[list[tuple[int, float]]]:
        hits = retriever.search([examples[i].query for i in positions], fetch) if positions else []
        kept = [[(p, s) for p, s in found if passages[p].group != examples[i].exclude_group
                 or not passages[p].group][:k] for i, found in zip(positions, hits)]
        return kept

    key = {"corpus": corpus_fp, "retriever": retriever.fingerprint(), "k": k,
           "queries": fingerprint([(e.query, e.exclude_group) for e in examples])}
    hits = cache.json("retrievals", key, search)
    retrieved: list[list[Retrieved]] = [[] for _ in examples]
    for i, found in zip(positions, hits):
        retrieved[i] = [Retrieved(passages[p], float(score)) for p, score in found]
    return retrieved, label, corpus_fp


def _read_resume_file(path: Path) -> dict[str, dict[str, Any]]:
    """Stats of the examples an earlier, interrupted run finished (a torn last line is dropped)."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["id"]] = entry["stats"]
    return done


def ranked_metrics(task: Task, metrics: dict[str, Any]) -> dict[str, bool]:
    """Whether higher is better, for each metric the task ranks by (its `recall@k` covers every
    recall@N); counts such as `n_questions` are reported but not ranked."""
    directions = {}
    for name, value in metrics.items():
        key = re.sub(r"@\d+$", "@k", name)
        if key in task.higher_is_better and isinstance(value, (int, float)):
            directions[name] = task.higher_is_better[key]
    return directions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(raghub.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _plugin_origins(task: Task, method: Method, retriever: Retriever | None) -> dict[str, str | None]:
    """Which installed plugin (built-in, or distribution and version) provided each part."""
    found = registry()
    return {"task family": found.origin("task family", task.family), "method": found.origin("method", method.name),
            "retriever": found.origin("retriever", retriever.name) if retriever else None}


def execute(resolved: ResolvedRun) -> dict[str, Any]:
    """Run a resolved request to completion and append its record to the results store."""
    request = resolved.request
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    cache = Cache(cache_root())
    model = resolved.backend.load(request.model, request.device, request.dtype, request.batch_size)
    task = resolved.task
    method = resolved.method_class(model, cache, **resolved.plugin_options["method"])
    try:
        examples = task.examples(model, request.limit)
        if not examples:
            raise UsageError(f"task '{task.name}' produced no examples")
        retrieved: list[list[Retrieved]] = [[] for _ in examples]
        corpus_label, corpus_fp, retriever = None, None, None
        if resolved.retriever_class is not None:
            retriever = resolved.retriever_class(cache, **resolved.plugin_options["retriever"])
            with stderr.status(f"retrieving top-{resolved.n_docs} with {retriever.name}"):
                retrieved, corpus_label, corpus_fp = retrieve(task, retriever, examples,
                                                              resolved.n_docs, cache)
        config = {
            "task": task.fingerprint(),
            "method": {"name": method.name, **method.settings},
            "retriever": retriever.fingerprint() if retriever else None,
            "corpus": {"label": corpus_label, "fingerprint": corpus_fp},
            "n_docs": resolved.n_docs, "limit": request.limit, "model": model.name,
            "model_fingerprint": model.fingerprint,
            "model_backend": {"name": resolved.backend.name, **resolved.backend.settings},
            "batch_size": request.batch_size, "dtype": model.dtype,
        }
        resume_path = Path(request.results_dir) / ".partial" / f"{fingerprint(config)}.jsonl"
        stats = _evaluate_resumably(task, method, examples, retrieved, resume_path,
                                    request.batch_size)
        metrics = task.aggregate([stats[e.id] for e in examples])
        record = {
            "task": task.name, "family": task.family, "method": method.name,
            "retriever": retriever.name if retriever else None, "model": model.name,
            "n_docs": resolved.n_docs, "settings": resolved.settings_label(),
            "corpus": corpus_label, "n_examples": len(examples), "metrics": metrics,
            "higher_is_better": ranked_metrics(task, metrics),
            "method_stats": method.run_stats(), "config": config,
            "plugins": _plugin_origins(task, method, retriever),
            "raghub_version": raghub.__version__, "git_commit": _git_commit(),
            "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
            "duration_s": round(time.perf_counter() - clock, 2), "hardware": model.hardware(),
        }
    finally:
        method.close()
    append_record(request.results_dir, record)
    resume_path.unlink(missing_ok=True)
    return record


def _evaluate_resumably(task: Task, method: Method, examples: Sequence[Example],
                        retrieved: Sequence[Sequence[Retrieved]], resume_path: Path,
                        batch_size: int) -> dict[str, dict[str, Any]]:
    """Per-example stats, continuing from the resume file and appending to it per batch."""
    resume_path.parent.mkdir(parents=True, exist_ok=True)
    stats = _read_resume_file(resume_path)
    todo = [i for i, e in enumerate(examples) if e.id not in stats]
    with _progress() as progress, open(resume_path, "a", encoding="utf-8") as resume:
        bar = progress.add_task(f"{task.name} · {method.name}", total=len(examples),
                                completed=len(examples) - len(todo))
        for first in range(0, len(todo), batch_size):
            batch = todo[first : first + batch_size]
            try:
                results = task.evaluate(method, [examples[i] for i in batch],
                                        [retrieved[i] for i in batch])
            except NotImplementedError:
                raise UsageError(f"method '{method.name}' does not support {task.family} "
                                 f"tasks such as '{task.name}'") from None
            for i, result in zip(batch, results):
                stats[examples[i].id] = result
                resume.write(json.dumps({"id": examples[i].id, "stats": result}) + "\n")
            resume.flush()
            progress.advance(bar, len(batch))
    return stats
