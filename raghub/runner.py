"""One run, from names to a stored record: resolve plugins, load, retrieve, evaluate, record.

Every input is validated before the model loads (`resolve`), so bad input fails fast and
writes nothing. Each example's line of the samples log (its stats, retrieved passages and what
the task adds) is appended to a resume file as its batch finishes, one checksummed line per
batch; an interrupted run, started again with the same settings, continues where it stopped,
and computes again any batch whose line is damaged. A finished run writes the lines, in
example order, to `samples/<record id>.jsonl` beside its record.

A command may sweep comma lists of tasks, methods and n_docs (`resolve_sweep`): every
combination is resolved before any model loads, then `run_sweep` runs them in order, loading
each distinct model once and reusing the stored record of an identical earlier run.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import re
import secrets
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import raghub
from raghub import allocator, distributed
from raghub.distributed import notice
from raghub.cache import Cache, cache_root, fingerprint
from raghub.checkpoints import Checkpoint, checkpoint_stats, generator_checkpoint, generator_identity, with_trained_generator
from raghub.errors import ReturnedWrong, UsageError, amount
from raghub.interfaces import (COMMON_TASK_KEYS, Example, Method, Plugin, Registry, Retrieved, Retriever, Task,
                               check_name_and_family)
from raghub.models import LanguageModel, ModelBackend, ModelSpec, choose_backend
from raghub.options import dashed
from raghub.pace import Pace, duration
from raghub.plugin_manager import PluginHost
from raghub.record import Record
from raghub.records import append_record, check_store, read_records, samples_file
from raghub.retrieval import Retrieval, task_corpus
from raghub.stages import FUSION_K, StagePlan, Stages
from raghub.settings import CORE_OPTIONS, read_task_definition
from raghub.worklog import passage_fields, work_means

#: config keys known once the model loads -> the model attribute: the weights' content and the
#: dtype that ran (`--dtype auto` picks one), so a resume file never mixes two of either
LOADED = {"model_fingerprint": "fingerprint", "model_dtype": "dtype"}
#: the settings a command may give as comma lists (or YAML lists), one run per combination
SWEPT_SETTINGS = ("task", "method", "n_docs")
stderr = Console(stderr=True)


@dataclass
class RunRequest:
    """What the user asked for, before anything is resolved: the core settings (converted by
    their declarations) and every other option, for the plugins."""

    task: str
    method: str
    retriever: str | None = None
    n_docs: int | None = None
    reranker: str | None = None
    rerank_depth: int | None = None
    fusion_k: int | None = None
    refiner: str | None = None
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
    #: the plugins the names were looked up in
    host: PluginHost
    #: the `--checkpoint` whose generator the method evaluates (loaded into its model)
    checkpoint: Checkpoint | None = None
    #: the retrievers (`retriever_class` is the first), reranker and refiner; None: no retriever
    stages: StagePlan | None = None

    def stage_kinds(self) -> dict[str, type[Plugin] | None]:
        """The plugin class of each retrieval stage, by the kind its options are routed to."""
        return self.stages.kinds() if self.stages else {"retriever": None}

    def retriever_kinds(self) -> list[tuple[str, type[Plugin]]]:
        """(kind, class) of each retriever: one, or the parts of a hybrid."""
        return [(kind, cls) for kind, cls in self.stage_kinds().items() if kind.startswith("retriever") and cls]

    def settings_label(self) -> str:
        """The options given that differ from their defaults, e.g. 'combine=True'."""
        parts = []
        for kind, cls in (("task", type(self.task)), ("method", self.method_class), *self.stage_kinds().items()):
            for key, value in self.plugin_options.get(kind, {}).items():
                if cls is not None and value != cls.options[key].default:
                    parts.append(f"{key}={value}")
        if self.stages:
            stages = self.stages
            given = {"reranker": stages.reranker and stages.reranker.name, "refiner": stages.refiner and stages.refiner.name,
                     "rerank_depth": stages.depth, "fusion_k": stages.fusion_k if stages.fusion_k != FUSION_K else None}
            parts += [f"{key}={value}" for key, value in given.items() if value is not None]
        return ", ".join(sorted(set(parts)))

    @functools.cached_property
    def code(self) -> dict[str, dict[str, str] | None]:
        """What identifies the code of each plugin the run uses (`code_identity`)."""
        code_identity = self.host.code_identity
        return {"task family": code_identity("task family", self.task.family),
                "method": code_identity("method", self.method_class.name),
                **self.retrieval_code(),
                "model backend": code_identity("model backend", self.backend.name)}

    def stage_code(self) -> dict[str, Any]:
        """The code identity of each retriever (`retrievers`), and of the reranker and the
        refiner when the run has them."""
        kinds, code_identity = self.stage_kinds(), self.host.code_identity
        return {"retrievers": [code_identity("retriever", cls.name) for _, cls in self.retriever_kinds()],
                **{kind: code_identity(kind, kinds[kind].name) for kind in ("reranker", "refiner") if kinds.get(kind)}}

    def retrieval_code(self) -> dict[str, Any]:
        """The record's code entries of the retrieval stages: `retriever` (a list for a hybrid;
        None without one), and `reranker` and `refiner` when the run has them."""
        code = self.stage_code()
        retrievers = code.pop("retrievers")
        return {"retriever": retrievers[0] if len(retrievers) == 1 else retrievers or None, **code}

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """Everything the run's results depend on, known before the model loads (`model` is the
        --model spec; None: the embedded default). Its fingerprint names the resume file and
        recognises an identical earlier run in the results store. A checkpoint is named by its
        identity (training fingerprint and step), not its path."""
        request = self.request
        retriever, corpus = None, {"label": None, "fingerprint": None}
        if self.retriever_class is not None:
            retrievers = [cls(Cache(cache_root()), **self.plugin_options[kind]).fingerprint()
                          for kind, cls in self.retriever_kinds()]
            retriever = retrievers[0] if len(retrievers) == 1 else retrievers
            _, label, corpus_fp = task_corpus(self.task)
            corpus = {"label": label, "fingerprint": corpus_fp}
        stages = self.stages.settings(self.plugin_options) if self.stages else None
        return {
            "task": self.task.fingerprint(),
            "method": {"name": self.method_class.name,
                       **self.method_class.resolve_options(self.plugin_options["method"]),
                       **({"checkpoint": self.checkpoint.identity} if self.checkpoint else {})},
            "retriever": retriever, "corpus": corpus, **({"stages": stages} if stages else {}),
            "n_docs": self.n_docs, "limit": request.limit, "model": request.model,
            "model_backend": {"name": self.backend.name, **self.backend.settings},
            "batch_size": request.batch_size, "dtype": request.dtype, "code": self.code,
        }


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


def task_family(spec: str, found: Registry) -> tuple[dict[str, Any], type[Task]]:
    """The definition of task `spec` (a registered name or a task YAML path), checked against
    its family's schema, and the family's class."""
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        definition = read_task_definition(spec)
    elif spec in found.tasks:
        definition = found.tasks[spec]
    else:
        raise _unknown("task", spec, list(found.tasks), "tasks")
    check_name_and_family(definition, definition.get("source", spec))
    if definition["family"] not in found.task_families:
        raise UsageError(f"task '{definition['name']}' needs the task family "
                         f"'{definition['family']}', which no installed plugin provides")
    task_class = found.task_families[definition["family"]]
    task_class.check_definition(definition)
    return definition, task_class


def _check_results_dir(results_dir: Path) -> None:
    """The results dir is a folder, or can be made in its nearest existing parent, and files can
    be written there: probed by creating a file that vanishes when closed (nothing is left)."""
    existing = next(folder for folder in (results_dir, *results_dir.parents) if folder.exists())
    if not existing.is_dir():
        raise UsageError(f"--results-dir {results_dir} is a file, not a folder" if existing == results_dir
                         else f"--results-dir {results_dir} is inside {existing}, which is a file")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UsageError(f"--results-dir {results_dir} cannot be written ({error.strerror}); give a "
                         "folder you can write to") from None
    check_store(results_dir)


def _check_data_dir(data_dir: str) -> None:
    """`--data-dir` (or RAGHUB_DATA_DIR) is a folder."""
    if not Path(data_dir).is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a folder (it may come from RAGHUB_DATA_DIR); give "
                         "the folder holding the tasks' data, or leave it out")


def _check_device(device: str) -> None:
    """`--device` names a torch device this machine has (imports torch: only when it is given)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device} is not a torch device; give cpu, cuda, cuda:N or mps, "
                         "or leave it out") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: this machine has no CUDA device; give --device cpu "
                             "or leave it out")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA devices "
                             f"(cuda:0 to cuda:{count - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: this machine has no MPS device; give --device cpu "
                         "or leave it out")


def resolve(request: RunRequest, host: PluginHost, built_tasks: dict[str, Task] | None = None) -> ResolvedRun:
    """Look up and validate every name and option in the host's plugins; raises UsageError on
    bad input. A task already in `built_tasks` (keyed by its definition, data folder and
    options) is reused."""
    found = host.registry
    definition, task_class = task_family(request.task, found)
    if request.method not in found.methods:
        raise _unknown("method", request.method, list(found.methods), "methods")
    method_class = found.methods[request.method]
    if not method_class.supports(task_class):
        supported = f" (it supports: {', '.join(sorted(method_class.families))})" if method_class.families else ""
        raise UsageError(f"method '{request.method}' does not support {task_class.family} tasks such as "
                         f"'{definition['name']}'{supported}")
    if not method_class.first_stage and not method_class.needs_retrieval:
        raise UsageError(f"method '{request.method}' asks for its own passages (first_stage = False) but "
                         "declares needs_retrieval = False, so the run would have no retriever")
    retriever_class, stages = None, None
    n_docs = 0
    if method_class.needs_retrieval:
        n_docs = request.n_docs if request.n_docs is not None else definition.get("n_docs", COMMON_TASK_KEYS["n_docs"].default)
        if n_docs < 1:
            raise UsageError(f"--n-docs must be a positive integer for method '{request.method}', "
                             f"not {n_docs!r}")
        stages = _stage_plan(request, request.retriever or definition.get("retriever", COMMON_TASK_KEYS["retriever"].default),
                             n_docs, found)
        retriever_class = stages.retrievers[0]
    options = _split_options(request.options, {"task": task_class, "method": method_class,
                                               **(stages.kinds() if stages else {"retriever": None})})
    if request.data_dir is not None:
        _check_data_dir(request.data_dir)
    built_tasks = {} if built_tasks is None else built_tasks
    task_key = fingerprint(definition, request.data_dir, options["task"])
    if task_key not in built_tasks:
        built_tasks[task_key] = task_class(definition["name"], definition, request.data_dir,
                                           registry=found, **options["task"])
        built_tasks[task_key].check()
    task = built_tasks[task_key]
    backend = choose_backend(found, request.model, request.model_backend, request.model_args)
    backend.check(request.model)
    backend.check_provides(task_class.requires, f"task '{definition['name']}' ({task_class.family})")
    backend.check_provides(method_class.requires, f"method '{request.method}'")
    if stages and stages.reranker:
        backend.check_provides(stages.reranker.requires, f"reranker '{stages.reranker.name}'")
    checkpoint = generator_checkpoint(method_class, options["method"])
    if checkpoint is not None:
        backend.check_provides({"weights"}, f"--checkpoint {checkpoint.folder.parent} (a trained generator)")
    _check_results_dir(Path(request.results_dir))
    if request.device is not None:
        _check_device(request.device)
    return ResolvedRun(request, task, method_class, retriever_class, backend, n_docs, options, host, checkpoint, stages)


def _stage_plan(request: RunRequest, retriever_name: str, n_docs: int, found: Registry) -> StagePlan:
    """The run's retrievers (`+`-joined names), reranker and refiner, looked up, and the
    depth and fusion settings checked against them."""
    parts = retriever_name.split("+")
    for name in parts:
        if name not in found.retrievers:
            raise _unknown("retriever", name, list(found.retrievers), "retrievers")
    if len(set(parts)) < len(parts):
        raise UsageError(f"--retriever {retriever_name} names a retriever twice")
    chosen = {}
    for kind, table, name in (("reranker", found.rerankers, request.reranker),
                              ("refiner", found.refiners, request.refiner)):
        if name is not None and name not in table:
            raise _unknown(kind, name, list(table), f"{kind}s")
        chosen[kind] = table[name] if name is not None else None
    fetched = len(parts) > 1 or chosen["reranker"] is not None
    for flag, value in (("--rerank-depth", request.rerank_depth), ("--fusion-k", request.fusion_k)):
        if value is not None and not (fetched if flag == "--rerank-depth" else len(parts) > 1):
            raise UsageError(f"{flag} needs {'--reranker or ' * (flag == '--rerank-depth')}a hybrid "
                             f"--retriever (names joined by +, e.g. bm25+dense)")
    if request.rerank_depth is not None and request.rerank_depth < n_docs:
        raise UsageError(f"--rerank-depth {request.rerank_depth} is less than --n-docs {n_docs}; the depth "
                         "is how many passages are fetched to keep the best --n-docs")
    return StagePlan(tuple(found.retrievers[name] for name in parts), chosen["reranker"], chosen["refiner"],
                     request.fusion_k or FUSION_K, request.rerank_depth)


def _progress() -> Progress:
    """A bar per run; its time left is `Pace.remaining`, the field `remaining` of the task."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[remaining]} left"), console=stderr)


def _sweep_values(key: str, value: Any) -> list[Any]:
    """The values of a swept setting: a YAML list, a comma list, or one value; a list with an
    empty entry (`--task squad,`) is a UsageError."""
    if isinstance(value, (list, tuple)):
        values = list(value)
    elif isinstance(value, str) and "," in value:
        values = [part.strip() for part in value.split(",")]
    else:
        return [value]
    if any(part is None or part == "" for part in values):
        raise UsageError(f"--{dashed(key)} {value!r}: the list has an empty {'value' if key == 'n_docs' else 'name'}; "
                         "remove the extra comma")
    return values


def resolve_sweep(settings: dict[str, Any], host: PluginHost) -> list[ResolvedRun]:
    """One resolved run per combination of the swept settings' values (tasks, then methods, then
    n_docs), all validated before any model loads; combinations that are the same run (a
    closed-book method at several n_docs) are kept once."""
    swept = {key: _sweep_values(key, settings[key]) for key in SWEPT_SETTINGS if settings.get(key) is not None}
    runs: dict[str, ResolvedRun] = {}
    built_tasks: dict[str, Task] = {}
    for values in itertools.product(*swept.values()):
        resolved = resolve(RunRequest.from_settings({**settings, **dict(zip(swept, values))}), host, built_tasks)
        runs.setdefault(fingerprint(resolved.config), resolved)
    if not any(run.retriever_class for run in runs.values()):
        ignored = [f"--{dashed(key)}" for key in ("retriever", "n_docs", "reranker", "rerank_depth", "fusion_k", "refiner")
                   if settings.get(key) is not None]
        if ignored:
            methods = ", ".join(sorted({run.method_class.name for run in runs.values()}))
            notice(f"{' and '.join(ignored)} ignored: method '{methods}' retrieves nothing")
    return list(runs.values())


def _stored_record(results_dir: Path, config_fingerprint: str) -> Record | None:
    """The newest stored record whose config, as known before the model loads (all but the
    weights' fingerprint), has this fingerprint, if any."""
    def known_before_loading(record: Record) -> dict[str, Any]:
        return {key: value for key, value in record.config.items() if key not in LOADED}

    return next((r for r in reversed(read_records(results_dir))
                 if fingerprint(known_before_loading(r)) == config_fingerprint), None)


def run_sweep(runs: Sequence[ResolvedRun], force: bool = False) -> Iterator[Record]:
    """The record of each resolved run, in order, as each finishes: an identical earlier run's
    stored record (said on stderr; `force` runs it again, rebuilding whatever it had cached),
    else a new run's. Each distinct model (with the trained generator of a checkpoint, or
    without) loads once. Under a launcher every rank runs the sweep, and only rank 0 yields
    records."""
    models: dict[str, LanguageModel] = {}
    cache = Cache(cache_root(), stale_before=time.time() if force else None)
    main = distributed.ranks().is_main
    stderr.quiet = not main
    for resolved in runs:
        request = resolved.request
        stored = None if force else _stored_record(request.results_dir, fingerprint(resolved.config))
        if stored is not None:
            notice(f"{stored.task} · {stored.method}"
                  + (f" · k={stored.n_docs}" if stored.retriever else "")
                  + f": reusing the identical run stored in {request.results_dir} "
                  f"(finished {stored.finished_at or 'earlier'}); --force runs it again")
            if main:
                yield stored
            continue
        model_key = fingerprint(resolved.backend.name, resolved.backend.settings, request.model,
                                request.device, request.dtype, request.batch_size,
                                generator_identity(resolved.checkpoint))
        if model_key not in models:
            models[model_key] = _load_model(resolved)
        record = execute(resolved, models[model_key], cache)
        if main:
            yield record


def _load_model(resolved: ResolvedRun) -> LanguageModel:
    """The run's model, on this rank's device, with the checkpoint's generator when the method
    evaluates one."""
    request = resolved.request
    spec = ModelSpec(request.model, request.model_backend, request.model_args, request.dtype)
    return with_trained_generator(resolved.backend.load_from_spec(spec, distributed.device(request.device),
                                                                  request.batch_size), resolved.checkpoint)


def _checksum(batch: dict[str, Any]) -> str:
    """The checksum of a batch in a resume file, over its JSON escaped to ASCII (so that any
    text, a lone surrogate included, can be hashed); reading keeps the order of keys."""
    return fingerprint(json.dumps(batch))


def _checked_stats(task: Task, examples: Sequence[Example], results: Any) -> list[dict[str, Any]]:
    """What `task.evaluate` returned for a batch: one JSON-able stats dict per example, else a
    RunError naming the task family's plugin."""
    if not isinstance(results, (list, tuple)) or len(results) != len(examples):
        returned = amount(len(results), "stats dict") if isinstance(results, (list, tuple)) else repr(results)
        raise ReturnedWrong("task family", task, f"{returned} for {amount(len(examples), 'example')}")
    for example, stats in zip(examples, results):
        if not isinstance(stats, dict):
            raise ReturnedWrong("task family", task, f"{stats!r} for example {example.id}; it must return one dict of stats "
                                       "per example")
        try:
            json.dumps(stats)
        except (TypeError, ValueError) as error:
            raise ReturnedWrong("task family", task, f"stats for example {example.id} that are not JSON: {error}") from None
    return list(results)


def _batch_line(lines: list[dict[str, Any]], counters: dict[str, int]) -> str:
    """A finished batch's line in a resume file: its sample lines, the method counters it
    added, and the checksum of both."""
    batch = {"lines": lines, "counters": counters}
    return json.dumps({**batch, "checksum": _checksum(batch)}) + "\n"


def _verified_batch(line: bytes) -> dict[str, Any] | None:
    """The batch a resume file's line holds, None when it is damaged (torn, not UTF-8 or not
    JSON, edited: its checksum fails) or an older raghub's."""
    try:
        entry = json.loads(line)
        batch = {"lines": entry["lines"], "counters": entry["counters"]}
        return batch if entry["checksum"] == _checksum(batch) else None
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        return None


def _read_resume_file(path: Path, report: bool = True) -> tuple[dict[str, dict[str, Any]], Counter[str]]:
    """The sample lines of the examples finished so far, by example id, from the shared resume
    file and every rank's, and the method counters of their batches. A damaged batch is
    dropped (named on stderr when `report`), so its examples are computed again."""
    done: dict[str, dict[str, Any]] = {}
    counters: Counter[str] = Counter()
    for file in distributed.resume_files(path):
        dropped = []
        for number, line in enumerate(file.read_bytes().split(b"\n") if file.exists() else (), start=1):
            if not line.strip():
                continue
            batch = _verified_batch(line)
            if batch is None:
                dropped.append(number)
                continue
            counters.update(batch["counters"])
            done.update((sample["id"], sample) for sample in batch["lines"])
        if dropped and report:
            notice(f"{file}: {len(dropped)} damaged batch{'es' * (len(dropped) > 1)} dropped (line "
                   f"{', '.join(map(str, dropped))}); those examples are computed again")
    return done, counters


def sample_line(task: Task, example: Example, stats: dict[str, Any], retrieved: Sequence[Retrieved],
                work: dict[str, Any]) -> dict[str, Any]:
    """The example's line of the samples log: its id, stats, first-stage passages (id, title,
    score, rank) and what the method logged of its work, with the fields its task adds."""
    return task.sample_log(example, {"id": example.id, **stats, "retrieved": passage_fields(retrieved), **work})


def ranked_metrics(task: Task, metrics: dict[str, Any]) -> dict[str, bool]:
    """Whether higher is better, for each metric the task ranks by (its `recall@k` covers every
    recall@N); counts such as `n_questions` are reported but not ranked."""
    directions = {}
    for name, value in metrics.items():
        key = re.sub(r"@\d+$", "@k", name)
        if key in task.higher_is_better and isinstance(value, (int, float)):
            directions[name] = task.higher_is_better[key]
    return directions


def git_commit() -> str | None:
    """The commit of the raghub checkout that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(raghub.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _plugin_origins(task: Task, method: Method, resolved: ResolvedRun) -> dict[str, str | None]:
    """Which installed plugin (built-in, or distribution and version) provided each part (the
    retrievers of a hybrid `+`-joined; a reranker and a refiner when the run has them)."""
    found = resolved.host.registry
    kinds = resolved.stage_kinds()
    retrievers = [found.origin("retriever", cls.name) for _, cls in resolved.retriever_kinds()]
    return {"task family": found.origin("task family", task.family), "method": found.origin("method", method.name),
            "retriever": " + ".join(retrievers) or None,
            **{kind: found.origin(kind, kinds[kind].name) for kind in ("reranker", "refiner") if kinds.get(kind)}}


def execute(resolved: ResolvedRun, model: LanguageModel | None = None,
            cache: Cache | None = None) -> Record | None:
    """Run a resolved request to completion (on `model` when it is already loaded) and append
    its record to the results store. The method and the retriever each cache their work in
    `cache` (default: the cache folder) keyed by their code. Under a launcher each rank
    evaluates its share, and rank 0 alone writes and returns the record (the others return None)."""
    request = resolved.request
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    cache = cache or Cache(cache_root())
    if model is None:
        model = _load_model(resolved)
    task = resolved.task
    method = resolved.method_class(model, cache.scoped(resolved.code["method"]), **resolved.plugin_options["method"])
    model.counters = method.counters  # what fitting inputs into the model leaves out counts for this run
    try:
        examples = task.examples(model, request.limit)
        if not examples:
            raise UsageError(f"task '{task.name}' produced no examples")
        retrieved: list[list[Retrieved]] = [[] for _ in examples]
        corpus_label = None
        if resolved.retriever_class is not None:
            retrieval = _retrieval(resolved, task, model, cache)
            n_docs = retrieval.clamp(resolved.n_docs)
            with stderr.status(f"retrieving top-{n_docs} with {resolved.stages.label}"):
                retrieval.open()
                if method.first_stage:
                    retrieved = retrieval.first_stage(examples, n_docs)
            method.bind_retrieval(retrieval, n_docs)
            corpus_label = retrieval.corpus_label
        # the weights' content is known once loaded: a resumed run never mixes two models
        config = {**resolved.config, **{key: getattr(model, attribute) for key, attribute in LOADED.items()}}
        resume_path = Path(request.results_dir) / ".partial" / f"{fingerprint(config)}.jsonl"
        done = _evaluate_resumably(task, method, examples, retrieved, resume_path,
                                   request.batch_size, announce=request.limit is None)
        if not distributed.ranks().is_main:
            return None
        lines = [done[e.id] for e in examples]
        metrics = task.aggregate(lines)
        higher_is_better = ranked_metrics(task, metrics)
        standard_errors = task.standard_errors(lines)
        record_id = f"{started:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        record = Record(
            id=record_id, samples=samples_file(record_id),
            task=task.name, task_version=task.config.get("version", 1),
            family=task.family, method=method.name,
            retriever=resolved.stages.label if resolved.stages else None, model=model.name,
            n_docs=resolved.n_docs, settings=resolved.settings_label(),
            corpus=corpus_label, n_examples=len(examples), metrics=metrics,
            higher_is_better=higher_is_better,
            stderr={name: standard_errors.get(name) for name in higher_is_better},
            totals=task.totals(lines),
            method_stats={**method.record_stats(), **work_means(lines), **checkpoint_stats(resolved.checkpoint)}, config=config,
            plugins=_plugin_origins(task, method, resolved),
            raghub_version=raghub.__version__, git_commit=git_commit(),
            started_at=started.isoformat(), finished_at=datetime.now(timezone.utc).isoformat(),
            duration_s=round(time.perf_counter() - clock, 2), hardware={**model.hardware(), "allocator": allocator.in_effect()},
        )
    except ReturnedWrong as error:  # a contract check: named with the plugin's origin
        raise resolved.host.returned_wrong(error.plugin, error.what) from None
    finally:
        method.close()
    append_record(request.results_dir, record, lines)
    for path in distributed.resume_files(resume_path):
        path.unlink(missing_ok=True)
    return record


def _retrieval(resolved: ResolvedRun, task: Task, model: LanguageModel, cache: Cache) -> Retrieval:
    """The run's retrieval service: its retrievers, reranker and refiner, each with its own
    cache keyed by its code."""
    code, options = resolved.stage_code(), resolved.plugin_options
    retrievers = [cls(cache.scoped(identity), **options[kind])
                  for (kind, cls), identity in zip(resolved.retriever_kinds(), code["retrievers"])]
    stages = {kind: cls(model, cache.scoped(code[kind]), **options[kind])
              for kind, cls in resolved.stage_kinds().items() if kind in ("reranker", "refiner") and cls}
    return Retrieval(task, retrievers[0], retrievers[0].cache,
                     Stages(retrievers[1:], resolved.stages.fusion_k, resolved.stages.depth, **stages))


def _evaluate_resumably(task: Task, method: Method, examples: Sequence[Example],
                        retrieved: Sequence[Sequence[Retrieved]], resume_path: Path,
                        batch_size: int, announce: bool = False) -> dict[str, dict[str, Any]]:
    """Each example's sample line (which holds its stats), by example id, continuing from the
    resume files and appending to this rank's per batch; the method's counters become those
    of every batch in them. Under a launcher each rank runs its share of the batches, and the
    lines and counters are gathered from all ranks' files once every rank has finished.
    `announce`: say up front how many examples will run, and after the first batch the time
    the rest will take."""
    resume_path.parent.mkdir(parents=True, exist_ok=True)
    done, _ = _read_resume_file(resume_path)
    distributed.barrier()  # every rank has read the same state before any rank appends
    todo = [i for i, e in enumerate(examples) if e.id not in done]
    batches = distributed.my_batches(todo, batch_size)
    with _progress() as progress, _append_to(distributed.my_resume_file(resume_path)) as resume:
        mine = sum(map(len, batches))
        bar = progress.add_task(f"{task.name} · {method.name}", total=len(examples) - len(todo) + mine,
                                completed=len(examples) - len(todo), remaining="?")
        pace = Pace(mine)
        if announce and mine:
            notice(f"{task.name} · {method.name}: {mine} examples to run, in {len(batches)} batch(es) of up "
                   f"to {batch_size}; the first batch gives the time to expect")
        for batch in batches:
            before = Counter(method.counters)
            results = task.evaluate(method, [examples[i] for i in batch], [retrieved[i] for i in batch])
            results = _checked_stats(task, [examples[i] for i in batch], results)
            added = {key: value - before[key] for key, value in method.counters.items() if value != before[key]}
            lines = [sample_line(task, examples[i], result, retrieved[i], method.work.take(examples[i].id))
                     for i, result in zip(batch, results)]
            resume.write(_batch_line(lines, added))  # the counters are kept exactly when the batch is
            resume.flush()
            pace.advance(len(batch))
            progress.update(bar, advance=len(batch), remaining=pace.remaining())
            if announce and pace.done == len(batch) < mine:
                notice(f"the first batch of {len(batch)} took {duration(pace.elapsed)}: expect about "
                       f"{pace.remaining()} more for the other {mine - pace.done}")
    distributed.barrier()  # every rank's lines are on disk
    done, counters = _read_resume_file(resume_path, report=False)  # damage was named by the first read
    method.counters.clear()
    method.counters.update(counters)
    return done


def _append_to(path: Path):
    """The resume file opened for appending, after a newline if a killed run tore its last line."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, 2)
            torn = handle.read(1) != b"\n"
    else:
        torn = False
    resume = open(path, "a", encoding="utf-8")
    if torn:
        resume.write("\n")
    return resume
