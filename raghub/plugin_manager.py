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
    "raghub.plugins.methods.parametric",
    "raghub.plugins.methods.device_cloud",
    "raghub.plugins.retrievers.bm25",
    "raghub.plugins.retrievers.dense",
    "raghub.plugins.models.huggingface",
)
BUILTIN = "built-in"
HOOK_NAMES = frozenset(name for name in dir(hookspecs) if name.startswith("register_"))

pm = pluggy.PluginManager("raghub")
pm.add_hookspecs(hookspecs)

#: plugin name -> why it was skipped (import failure, unknown hook, failing hook, ...)
failed_plugins: dict[str, str] = {}
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


def _register(module: Any, name: str) -> None:
    misspelled = unknown_hooks(module)
    if misspelled:
        report_failure(name, f"{', '.join(misspelled)} is not a raghub hook "
                             f"(the hooks: {', '.join(sorted(HOOK_NAMES))})")
        return
    pm.register(module, name)


def load_plugins() -> None:
    """Register the built-in plugins, then third-party entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in DEFAULT_PLUGINS:
        _register(importlib.import_module(name), name)
    allowed = os.environ.get("RAGHUB_LOAD_PLUGINS")
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for entry_point in importlib.metadata.entry_points(group="raghub"):
        if allowed_names is not None and entry_point.name not in allowed_names:
            continue
        try:
            module = entry_point.load()
        except (Exception, SystemExit) as error:  # a broken plugin must not stop the others
            report_failure(entry_point.name, f"failed to load: {type(error).__name__}: {error}")
            continue
        if pm.get_plugin(entry_point.name) is None:
            _register(module, entry_point.name)


def origin_of(plugin_name: str) -> str:
    """'built-in' or 'distribution version' for a registered plugin name."""
    if plugin_name in DEFAULT_PLUGINS:
        return BUILTIN
    for entry_point in importlib.metadata.entry_points(group="raghub", name=plugin_name):
        if entry_point.dist is not None:
            return f"{entry_point.dist.name} {entry_point.dist.version}"
    return "registered at run time"


def call_hook(hook_name: str, arguments: Callable[[str], dict[str, Any]]) -> None:
    """Call one hook on every plugin with `arguments(plugin name)`; a plugin whose
    implementation raises is named and skipped, and the others still run."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        given = arguments(impl.plugin_name)
        try:
            impl.function(**{name: given[name] for name in impl.argnames})
        except (Exception, SystemExit) as error:
            report_failure(impl.plugin_name, f"its {hook_name} failed: {type(error).__name__}: {error}")


def _shadowed_core_options(cls: type) -> list[str]:
    return sorted(set(getattr(cls, "options", {})) & RESERVED_NAMES)


@lru_cache(maxsize=1)
def registry() -> Registry:
    """Everything the loaded plugins registered. A later registration of a name wins (a
    third-party plugin can override a built-in); `origins` says which did."""
    load_plugins()
    found = Registry()

    def keyed(table: dict, kind: str, key_attr: str) -> Callable[[Any, str], None]:
        def add(cls: Any, plugin_name: str) -> None:
            shadowed = _shadowed_core_options(cls)
            if shadowed:
                raise UsageError(f"its {kind} '{getattr(cls, key_attr)}' declares option(s) "
                                 f"{', '.join(shadowed)}, which are raghub's own settings")
            table[getattr(cls, key_attr)] = cls
            found.origins[(kind, getattr(cls, key_attr))] = origin_of(plugin_name)
        return add

    def add_task(definition: dict, plugin_name: str) -> None:
        for key in ("name", "family"):
            if key not in definition:
                raise UsageError(f"a task definition lacks '{key}'")
        found.tasks[definition["name"]] = definition
        found.origins[("task", definition["name"])] = origin_of(plugin_name)

    for hook_name, add in (
        ("register_task_families", keyed(found.task_families, "task family", "family")),
        ("register_tasks", add_task),
        ("register_methods", keyed(found.methods, "method", "name")),
        ("register_retrievers", keyed(found.retrievers, "retriever", "name")),
        ("register_models", keyed(found.models, "model backend", "name")),
    ):
        call_hook(hook_name, lambda plugin, add=add: {"register": lambda item: add(item, plugin)})
    return found


def plugin_summaries() -> list[dict[str, Any]]:
    """One entry per loaded plugin: name, origin, hooks implemented."""
    load_plugins()
    summaries = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda pair: pair[0]):
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        summaries.append({"name": name, "origin": origin_of(name), "hooks": hooks})
    return summaries
