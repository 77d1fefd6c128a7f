"""From names and settings to a checked run, before anything loads: the request
(`RunRequest`), the plugins and options it resolves to (`ResolvedRun`), and the checks of every
input, so that bad input fails fast and writes nothing.

`resolve_sweep` resolves every combination of the swept settings (comma lists of tasks, methods
and n_docs), all before any model loads. `task_family` and `question_task` are the task lookup
that `raghub run`, `raghub score` and `raghub train` share.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from raghub.cache import Cache, cache_root, fingerprint
from raghub.checkpoints import Checkpoint, generator_checkpoint
from raghub.distributed import notice
from raghub.errors import UsageError
from raghub.families.qa import Question
from raghub.interfaces import COMMON_TASK_KEYS, Method, Plugin, Registry, Retriever, Task, check_name_and_family
from raghub.models import ModelBackend, choose_backend
from raghub.options import dashed
from raghub.plugin_manager import PluginHost, core_identity
from raghub.records import check_store
from raghub.retrieval import task_corpus
from raghub.settings import CORE_OPTIONS, read_task_definition
from raghub.stages import FUSION_K, StagePlan

#: the settings a command may give as comma lists (or YAML lists), one run per combination
SWEPT_SETTINGS = ("task", "method", "n_docs")
#: the entry point of the families whose examples are questions answered in text
ANSWER_ENTRY_POINT = "answer"
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
        """What identifies the code of each plugin the run uses (`code_identity`), and raghub's
        own (`core`: its metrics, prompts and retrieval run inside every plugin), so that neither
        a stored run nor a resume file of other code is taken for this run's."""
        code_identity = self.host.code_identity
        return {"core": core_identity(),
                "task family": code_identity("task family", self.task.family),
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
        identity (training fingerprint and step), and a local model file or folder also by its
        content (`model_content`), never by the path alone."""
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
            **({"model_content": content} if (content := self.backend.content_identity(request.model)) else {}),
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


class NoModel:
    """What a task builds its examples for when no model runs: their prompt template, meant for
    a model, is never rendered."""

    name = None

    @staticmethod
    def chat_prompt(message: str) -> str:
        return message


def question_task(spec: str, found: Registry, data_dir: str | None, limit: int | None, command: str) -> Task:
    """The task `spec` names, built and checked before any model loads, provided its family
    answers questions in text and its first `limit` examples include questions with answers
    (a UsageError naming `raghub COMMAND` otherwise)."""
    definition, task_class = task_family(spec, found)
    if task_class.entry_point != ANSWER_ENTRY_POINT:
        raise UsageError(f"task '{definition['name']}' ({task_class.family}) is not scored from answers; "
                         f"raghub {command} takes question-answering tasks")
    task = task_class(definition["name"], definition, data_dir, registry=found)
    task.check()
    if not answered_questions(task.examples(NoModel(), limit)):
        raise UsageError(f"task '{definition['name']}' has no questions with answers")
    return task


def answered_questions(examples: Sequence[Any]) -> list[Question]:
    """The examples that are questions with at least one answer."""
    return [example for example in examples if isinstance(example, Question) and example.answers]


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
