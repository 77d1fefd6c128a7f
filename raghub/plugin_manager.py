"""The plugin manager: the built-in plugins of `DEFAULT_PLUGINS`, then the `raghub` entry-point
group.

`RAGHUB_LOAD_PLUGINS` (comma-separated entry-point names; empty for none) limits which
third-party plugins load. A plugin that fails to import, implements a hook that does not exist
(a misspelled name), raises inside a hook or returns a value from one, registers what its hook
does not take (`check_declarations`: a class of another base, an empty name, options that are
not `Option`s, ...) or declares an option that shadows a core setting is named on stderr and
skipped; the other plugins keep working. What a plugin prints while it loads and registers goes
to stderr: stdout is the commands' output.

`code_identity` says which code a registered name runs, so that cached results and stored runs
made by other code are not reused.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import sys
import types
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Callable

import pluggy

from raghub import hookspecs
from raghub.cache import file_sha256, fingerprint
from raghub.errors import RunError, UsageError
from raghub.interfaces import Method, Registry, Retriever, Task, check_name_and_family
from raghub.judges import Judge
from raghub.models import ModelBackend
from raghub.objectives import Objective
from raghub.options import Option
from raghub.schema import Field
from raghub.settings import RESERVED_NAMES
from raghub.stages import Refiner, Reranker

#: the built-in plugins, registered through the same hooks as third-party ones
DEFAULT_PLUGINS = (
    "raghub.plugins.tasks.definitions",
    "raghub.plugins.tasks.language_modelling",
    "raghub.plugins.tasks.question_answering",
    "raghub.plugins.methods.none",
    "raghub.plugins.methods.incontext",
    "raghub.plugins.methods.ensemble",
    "raghub.plugins.methods.fid",
    "raghub.plugins.methods.parametric",
    "raghub.plugins.methods.device_cloud",
    "raghub.plugins.methods.rag_sequence",
    "raghub.plugins.methods.ircot",
    "raghub.plugins.methods.iter_retgen",
    "raghub.plugins.methods.adaptive",
    "raghub.plugins.methods.flare",
    "raghub.plugins.methods.self_ask",
    "raghub.plugins.methods.react",
    "raghub.plugins.retrievers.bm25",
    "raghub.plugins.retrievers.dense",
    "raghub.plugins.retrievers.dpr",
    "raghub.plugins.rerankers.lm",
    "raghub.plugins.rerankers.embedding",
    "raghub.plugins.rerankers.cross_encoder",
    "raghub.plugins.refiners.truncate",
    "raghub.plugins.refiners.extractive",
    "raghub.plugins.models.huggingface",
    "raghub.plugins.models.seq2seq",
    "raghub.plugins.models.openai",
    "raghub.plugins.training.rag",
    "raghub.plugins.judges.correctness",
)
BUILTIN = "built-in"
HOOK_NAMES = frozenset(name for name in dir(hookspecs) if name.startswith("register_"))

pm = pluggy.PluginManager("raghub")
pm.add_hookspecs(hookspecs)

#: plugin name -> why it was skipped (import failure, unknown hook, failing hook, ...)
failed_plugins: dict[str, str] = {}
#: plugin name -> 'built-in' or 'distribution version', for each plugin loaded from a package
_origins: dict[str, str] = {}
#: plugin name -> the distribution of its entry point
_distributions: dict[str, importlib.metadata.Distribution] = {}
_loaded = False


def report_failure(plugin_name: str, problem: str) -> None:
    """Name a plugin that is skipped, once, on stderr."""
    if plugin_name not in failed_plugins:
        failed_plugins[plugin_name] = problem
        print(f"raghub: plugin {plugin_name!r} is skipped: {problem}", file=sys.stderr)


def unknown_hooks(module: Any) -> list[str]:
    """Names of hook implementations in `module` that match no hookspec."""
    return sorted(attr for attr in dir(module)
                  if hasattr(getattr(module, attr), "raghub_impl") and attr not in HOOK_NAMES)


def _register(module: Any, name: str, origin: str) -> None:
    misspelled = unknown_hooks(module)
    if misspelled:
        report_failure(name, f"{', '.join(misspelled)} is not a raghub hook "
                             f"(the hooks: {', '.join(sorted(HOOK_NAMES))})")
        return
    pm.register(module, name)
    _origins[name] = origin


def load_plugins() -> None:
    """Register the built-in plugins, then third-party entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in DEFAULT_PLUGINS:
        _register(importlib.import_module(name), name, BUILTIN)
    allowed = os.environ.get("RAGHUB_LOAD_PLUGINS")
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for entry_point in importlib.metadata.entry_points(group="raghub"):
        if allowed_names is not None and entry_point.name not in allowed_names:
            continue
        distribution = f"{entry_point.dist.name} {entry_point.dist.version}" if entry_point.dist else "unknown"
        name = entry_point.name
        if pm.get_plugin(name) is not None:  # two distributions chose one name: keep both
            name = f"{entry_point.name} ({distribution})"
            print(f"raghub: plugin name {entry_point.name!r} is used by {_origins[entry_point.name]} "
                  f"and {distribution}; the second is listed as {name!r}", file=sys.stderr)
        if entry_point.dist:
            _distributions[name] = entry_point.dist
        try:
            with contextlib.redirect_stdout(sys.stderr):
                module = entry_point.load()
        except (Exception, SystemExit) as error:  # a broken plugin must not stop the others
            report_failure(name, f"failed to load: {type(error).__name__}: {error}")
            continue
        _register(module, name, distribution)


def origin_of(plugin_name: str) -> str:
    """'built-in' or 'distribution version' for a registered plugin name."""
    return _origins.get(plugin_name, "registered at run time")


def code_identity(kind: str, name: str) -> dict[str, str]:
    """What identifies the code behind a registered name (e.g. "retriever", "bm25"): the name,
    version and installed-files record of its plugin's distribution when an installer put it in
    place from a built package; else (a built-in, a local module, an editable install, a plugin
    registered at run time) a hash of its source files. Computed once per process."""
    plugin_name = registry().providers[(kind, name)]
    distribution = _distributions.get(plugin_name)
    if distribution is not None and _installed_from_a_build(distribution):
        return _distribution_identity(distribution)
    built_in = origin_of(plugin_name) == BUILTIN
    return {"source": _source_digest(_source_modules(pm.get_plugin(plugin_name), built_in))}


def _installed_from_a_build(distribution: importlib.metadata.Distribution) -> bool:
    """Whether an installer put the distribution in place (it wrote RECORD), not as an editable
    link to its source folder."""
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    return distribution.read_text("RECORD") is not None and not direct_url.get("dir_info", {}).get("editable")


@cache
def _distribution_identity(distribution: importlib.metadata.Distribution) -> dict[str, str]:
    """The distribution's name and version, and a hash of RECORD (every installed file's
    checksum): a rebuilt package of an unchanged version is told apart too."""
    return {"distribution": distribution.name, "version": distribution.version,
            "record": fingerprint(distribution.read_text("RECORD"))}


def _source_modules(plugin: Any, built_in: bool) -> tuple[str, ...]:
    """The modules whose source is a plugin's code: a built-in's own module (or package); the
    top-level package of any other plugin module, which holds the code it imports of its own;
    for an object registered at run time, the modules of its hooks."""
    if isinstance(plugin, types.ModuleType):
        return (plugin.__name__ if built_in else plugin.__name__.partition(".")[0],)
    return tuple(sorted({impl.function.__module__ for caller in pm.get_hookcallers(plugin) or []
                         for impl in caller.get_hookimpls() if impl.plugin is plugin}))


@cache
def _source_digest(module_names: tuple[str, ...]) -> str:
    """A hash of the modules' source: every .py file of a package, a module's file."""
    files: list[Path] = []
    for module in map(sys.modules.__getitem__, module_names):
        if hasattr(module, "__path__"):
            files += sorted(path for folder in module.__path__ for path in Path(folder).rglob("*.py"))
        elif getattr(module, "__file__", None):
            files.append(Path(module.__file__))
    return fingerprint([file_sha256(file) for file in files])


def call_hook(hook_name: str, arguments: Callable[[str], dict[str, Any]]) -> list[str]:
    """Call one hook on every plugin with `arguments(plugin name)`; a plugin whose
    implementation raises is named and skipped, and the others still run. Returns the names of
    the plugins that failed."""
    failed = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        given = arguments(impl.plugin_name)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                returned = impl.function(**{name: given[name] for name in impl.argnames})
            if returned is not None:
                raise UsageError(f"it returned {returned!r}; a hook registers through its "
                                 f"argument ({', '.join(impl.argnames)}) and returns nothing")
        except (Exception, SystemExit) as error:
            report_failure(impl.plugin_name, f"its {hook_name} failed: {type(error).__name__}: {error}")
            failed.append(impl.plugin_name)
    return failed


#: per kind of plugin class: its base class and its declared mappings (attribute -> the type of
#: each value), checked when it is registered
DECLARATIONS: dict[str, tuple[type, dict[str, type]]] = {
    "task family": (Task, {"options": Option, "higher_is_better": bool, "definition_schema": Field}),
    "method": (Method, {"options": Option}),
    "retriever": (Retriever, {"options": Option}),
    "reranker": (Reranker, {"options": Option}),
    "refiner": (Refiner, {"options": Option}),
    "model backend": (ModelBackend, {"options": Option}),
    "objective": (Objective, {"options": Option}),
    "judge": (Judge, {"options": Option}),
}


def check_declarations(cls: Any, kind: str, key_attr: str) -> None:
    """UsageError unless `cls` is a subclass of the kind's base whose name (`key_attr`) and
    description are strings, the name not empty, and whose declared mappings map names to values
    of their type."""
    base, mappings = DECLARATIONS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UsageError(f"it registered {cls!r} as a {kind}, which must be a subclass of raghub.{base.__name__}")
    name = getattr(cls, key_attr)
    if not isinstance(name, str) or not name:
        raise UsageError(f"its {kind} {cls.__name__} has {key_attr} {name!r}; it must be a non-empty string")
    if not isinstance(cls.description, str):
        raise UsageError(f"its {kind} '{name}' has description {cls.description!r}; it must be a string")
    for attribute, value_type in mappings.items():
        declared = getattr(cls, attribute)
        if not isinstance(declared, dict) or not all(isinstance(key, str) and isinstance(value, value_type)
                                                     for key, value in declared.items()):
            raise UsageError(f"its {kind} '{name}' declares {attribute} {declared!r}, which must map "
                             f"names to {value_type.__name__} values")


def returned_wrong(plugin: Any, what: str) -> RunError:
    """The error for a plugin (a method, retriever, reranker, refiner or task) that returned what its contract
    forbids, naming it and where it came from: "method 'top1' (raghub-top1 0.1.0) returned WHAT"."""
    kind = next(kind for kind, (base, _) in DECLARATIONS.items() if isinstance(plugin, base))
    name = plugin.family if isinstance(plugin, Task) else plugin.name
    found = registry()
    origin = found.origin(kind, name) if (kind, name) in found.origins else "not registered"
    return RunError(f"{kind} '{name}' ({origin}) returned {what}")


def _collect() -> tuple[Registry, list[str]]:
    """What every registered plugin registers, and the plugins that failed doing it."""
    found = Registry()

    def note_origin(kind: str, name: str, plugin_name: str) -> None:
        origin = origin_of(plugin_name)
        if (kind, name) in found.origins and found.origins[(kind, name)] != origin:
            found.overrides[(kind, name)] = found.origins[(kind, name)]
        found.origins[(kind, name)] = origin
        found.providers[(kind, name)] = plugin_name

    def keyed(table: dict, kind: str, key_attr: str, options_are_flags: bool = True) -> Callable[[Any, str], None]:
        def add(cls: Any, plugin_name: str) -> None:
            check_declarations(cls, kind, key_attr)
            name = getattr(cls, key_attr)
            shadowed = sorted(set(getattr(cls, "options", {})) & RESERVED_NAMES) if options_are_flags else []
            if shadowed:
                raise UsageError(f"its {kind} '{name}' declares option(s) {', '.join(shadowed)}, "
                                 "which are raghub's own settings")
            table[name] = cls
            note_origin(kind, name, plugin_name)
        return add

    def add_task(definition: dict, plugin_name: str) -> None:
        if not isinstance(definition, dict):
            raise UsageError(f"it registered {definition!r} as a task definition, which must be a dict "
                             "(as raghub.read_task_definition returns)")
        for key in ("name", "family"):
            if key not in definition:
                raise UsageError(f"a task definition lacks '{key}'")
        check_name_and_family(definition, definition.get("source", "a task definition"))
        found.tasks[definition["name"]] = definition
        note_origin("task", definition["name"], plugin_name)

    failed = []
    for hook_name, add in (
        ("register_task_families", keyed(found.task_families, "task family", "family")),
        ("register_tasks", add_task),
        ("register_methods", keyed(found.methods, "method", "name")),
        ("register_retrievers", keyed(found.retrievers, "retriever", "name")),
        ("register_rerankers", keyed(found.rerankers, "reranker", "name")),
        ("register_refiners", keyed(found.refiners, "refiner", "name")),
        # a backend's options are --model-args keys, not flags
        ("register_models", keyed(found.models, "model backend", "name", options_are_flags=False)),
        # an objective's options are --objective-args keys
        ("register_objectives", keyed(found.objectives, "objective", "name", options_are_flags=False)),
        ("register_judges", keyed(found.judges, "judge", "name", options_are_flags=False)),
    ):
        failed += call_hook(hook_name, lambda plugin, add=add: {"register": lambda item: add(item, plugin)})
    return found, failed


@lru_cache(maxsize=1)
def registry() -> Registry:
    """Everything the loaded plugins registered. A later registration of a name wins (a
    third-party plugin can override a built-in); `origins` says which plugin did, `overrides`
    whom it replaced. A plugin that fails in any hook is unregistered and everything collected
    again without it, so nothing it registered remains."""
    load_plugins()
    while True:
        found, failed = _collect()
        if not failed:
            return found
        for name in set(failed):
            pm.unregister(name=name)


def plugin_summaries() -> list[dict[str, Any]]:
    """One entry per loaded plugin: name, origin, hooks implemented."""
    load_plugins()
    summaries = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda pair: pair[0]):
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        summaries.append({"name": name, "origin": origin_of(name), "hooks": hooks})
    return summaries
