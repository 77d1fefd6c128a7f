"""The plugin manager: built-in plugins by module, then the `raghub` entry-point group.

`RAGHUB_LOAD_PLUGINS` (comma-separated entry-point names; empty for none) limits which
third-party plugins load. A third-party plugin that fails to import is reported by name and
skipped; a hook implementation whose name matches no hookspec fails loudly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import sys
from functools import lru_cache
from typing import Any, Callable

import pluggy

from raghub import hookspecs
from raghub.config import check_task_definition
from raghub.interfaces import Registry

BUILTIN_PACKAGE = "raghub.plugins"
BUILTIN = "built-in"

pm = pluggy.PluginManager("raghub")
pm.add_hookspecs(hookspecs)

#: entry-point name -> error message, for plugins that could not be loaded
failed_plugins: dict[str, str] = {}
_loaded = False


def _has_hookimpls(module: Any) -> bool:
    return any(hasattr(getattr(module, attr), "raghub_impl") for attr in dir(module))


def load_plugins() -> None:
    """Register built-in plugin modules, then third-party entry points (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
        if _has_hookimpls(module):
            pm.register(module, f"{BUILTIN_PACKAGE}.{info.name}")
    allowed = os.environ.get("RAGHUB_LOAD_PLUGINS")
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for entry_point in importlib.metadata.entry_points(group="raghub"):
        if allowed_names is not None and entry_point.name not in allowed_names:
            continue
        try:
            module = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not stop the others
            failed_plugins[entry_point.name] = f"{type(error).__name__}: {error}"
            print(f"raghub: plugin {entry_point.name!r} failed to load and is skipped: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            continue
        if pm.get_plugin(entry_point.name) is None:
            pm.register(module, entry_point.name)
    pm.check_pending()


def origin_of(plugin_name: str) -> str:
    """'built-in' or 'distribution version' for a registered plugin name."""
    if plugin_name.startswith(BUILTIN_PACKAGE + "."):
        return BUILTIN
    for entry_point in importlib.metadata.entry_points(group="raghub", name=plugin_name):
        if entry_point.dist is not None:
            return f"{entry_point.dist.name} {entry_point.dist.version}"
    return "registered at run time"


def _collect(hook_name: str, add: Callable[[Any, str], None]) -> None:
    """Call one hook on every plugin, telling `add` which plugin each registration came from."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        impl.function(register=lambda item, _origin=origin_of(impl.plugin_name): add(item, _origin))


@lru_cache(maxsize=1)
def registry() -> Registry:
    """Everything the loaded plugins registered. Later registrations of a name win
    (third-party plugins can override built-ins); the origin says which did."""
    load_plugins()
    found = Registry()

    def keyed(table: dict, kind: str, key_attr: str):
        def add(cls, origin):
            table[getattr(cls, key_attr)] = cls
            found.origins[(kind, getattr(cls, key_attr))] = origin
        return add

    def add_task(definition: dict, origin: str) -> None:
        check_task_definition(definition, origin)
        found.tasks[definition["name"]] = definition
        found.origins[("task", definition["name"])] = origin

    _collect("register_task_families", keyed(found.task_families, "task family", "family"))
    _collect("register_tasks", add_task)
    _collect("register_augmenters", keyed(found.augmenters, "method", "name"))
    _collect("register_retrievers", keyed(found.retrievers, "retriever", "name"))
    return found


def plugin_summaries() -> list[dict[str, Any]]:
    """One entry per loaded plugin: name, origin, hooks implemented."""
    load_plugins()
    summaries = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda pair: pair[0]):
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        summaries.append({"name": name, "origin": origin_of(name), "hooks": hooks})
    return summaries
