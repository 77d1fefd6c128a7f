"""The plugin manager: the built-in plugins of `DEFAULT_PLUGINS`, then the `raghub` entry-point
group.

`RAGHUB_LOAD_PLUGINS` (comma-separated entry-point names; empty for none) limits which
third-party plugins load. A plugin that fails to import, implements a hook that does not exist
(a misspelled name), raises inside a hook, or declares an option that shadows a core setting is
named on stderr and skipped; the other plugins keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from functools import lru_cache
from typing import Any, Callable

import pluggy

from raghub import hookspecs
from raghub.errors import UsageError
from raghub.interfaces import Registry
from raghub.settings import RESERVED_NAMES

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
    "raghub.plugins.models.huggingface",
    "raghub.plugins.models.seq2seq",
    "raghub.plugins.training.rag",
)
BUILTIN = "built-in"
HOOK_NAMES = frozenset(name for name in dir(hookspecs) if name.startswith("register_"))

pm = pluggy.PluginManager("raghub")
pm.add_hookspecs(hookspecs)

#: plugin name -> why it was skipped (import failure, unknown hook, failing hook, ...)
failed_plugins: dict[str, str] = {}
#: plugin name -> 'built-in' or 'distribution version', for each plugin loaded from a package
_origins: dict[str, str] = {}
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
        try:
            module = entry_point.load()
        except (Exception, SystemExit) as error:  # a broken plugin must not stop the others
            report_failure(name, f"failed to load: {type(error).__name__}: {error}")
            continue
        _register(module, name, distribution)


def origin_of(plugin_name: str) -> str:
    """'built-in' or 'distribution version' for a registered plugin name."""
    return _origins.get(plugin_name, "registered at run time")


def call_hook(hook_name: str, arguments: Callable[[str], dict[str, Any]]) -> list[str]:
    """Call one hook on every plugin with `arguments(plugin name)`; a plugin whose
    implementation raises is named and skipped, and the others still run. Returns the names of
    the plugins that failed."""
    failed = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        given = arguments(impl.plugin_name)
        try:
            impl.function(**{name: given[name] for name in impl.argnames})
        except (Exception, SystemExit) as error:
            report_failure(impl.plugin_name, f"its {hook_name} failed: {type(error).__name__}: {error}")
            failed.append(impl.plugin_name)
    return failed


def _collect() -> tuple[Registry, list[str]]:
    """What every registered plugin registers, and the plugins that failed doing it."""
    found = Registry()

    def note_origin(kind: str, name: str, plugin_name: str) -> None:
        origin = origin_of(plugin_name)
        if (kind, name) in found.origins and found.origins[(kind, name)] != origin:
            found.overrides[(kind, name)] = found.origins[(kind, name)]
        found.origins[(kind, name)] = origin

    def keyed(table: dict, kind: str, key_attr: str, options_are_flags: bool = True) -> Callable[[Any, str], None]:
        def add(cls: Any, plugin_name: str) -> None:
            name = getattr(cls, key_attr)
            shadowed = sorted(set(getattr(cls, "options", {})) & RESERVED_NAMES) if options_are_flags else []
            if shadowed:
                raise UsageError(f"its {kind} '{name}' declares option(s) {', '.join(shadowed)}, "
                                 "which are raghub's own settings")
            table[name] = cls
            note_origin(kind, name, plugin_name)
        return add

    def add_task(definition: dict, plugin_name: str) -> None:
        for key in ("name", "family"):
            if key not in definition:
                raise UsageError(f"a task definition lacks '{key}'")
        found.tasks[definition["name"]] = definition
        note_origin("task", definition["name"], plugin_name)

    failed = []
    for hook_name, add in (
        ("register_task_families", keyed(found.task_families, "task family", "family")),
        ("register_tasks", add_task),
        ("register_methods", keyed(found.methods, "method", "name")),
        ("register_retrievers", keyed(found.retrievers, "retriever", "name")),
        # a backend's options are --model-args keys, not flags
        ("register_models", keyed(found.models, "model backend", "name", options_are_flags=False)),
        # an objective's options are --objective-args keys
        ("register_objectives", keyed(found.objectives, "objective", "name", options_are_flags=False)),
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
