"""The plugin host: the built-in plugins of `DEFAULT_PLUGINS`, then the `raghub` entry-point
group, registered with a pluggy manager of their own per `PluginHost` (one per CLI invocation).

`RAGHUB_LOAD_PLUGINS` (comma-separated entry-point names; empty for none) limits which
third-party plugins load. A plugin that fails to import, implements a hook that does not exist
(a misspelled name), raises inside a hook or returns a value from one, registers what its hook
does not take (`check_declarations`: a class of another base, an empty name, options that are
not `Option`s, ...) or declares an option that shadows a core setting is named on stderr and
skipped; the other plugins keep working. What a plugin prints while it loads and registers goes
to stderr: stdout is the commands' output.

Hooks are called through pluggy, so a plugin's hook wrapper (`@hookimpl(wrapper=True)`) wraps
every implementation; each implementation is guarded so that its failure is its own plugin's.
`PluginHost.code_identity` says which code a registered name runs, so that cached results and
stored runs made by other code are not reused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import json
import os
import sys
import types
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
RUN_TIME = "registered at run time"
HOOK_NAMES = frozenset(name for name in dir(hookspecs) if name.startswith("register_"))
#: the package of kits shared by plugins, part of the code of each plugin that uses one
KITS = "raghub.kits"


class PluginFailed(Exception):
    """A plugin's hook implementation raised or returned a value (raised through pluggy's call,
    so that the hook wrappers see it)."""

    def __init__(self, plugin_name: str, problem: str) -> None:
        super().__init__(problem)
        self.plugin_name, self.problem = plugin_name, problem


class PluginHost:
    """The plugins of one raghub invocation: its pluggy manager (the built-ins, then the
    `raghub` entry points, loaded on first use), the plugins skipped and why, where each came
    from, and what they registered. The CLI makes one per invocation (`click`'s `ctx.obj`);
    code outside the CLI takes one as an argument."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("raghub")
        self.pm.add_hookspecs(hookspecs)
        #: plugin name -> why it was skipped (import failure, unknown hook, failing hook, ...)
        self.failed: dict[str, str] = {}
        #: plugin name -> 'built-in', 'distribution version' or 'registered at run time'
        self.origins: dict[str, str] = {}
        #: plugin name -> the distribution of its entry point
        self.distributions: dict[str, importlib.metadata.Distribution] = {}
        #: the plugin whose hook implementation pluggy is calling now
        self.calling: str | None = None
        self._loaded = False
        self._registry: Registry | None = None

    def report_failure(self, plugin_name: str, problem: str) -> None:
        """Name a plugin that is skipped, once, on stderr."""
        if plugin_name not in self.failed:
            self.failed[plugin_name] = problem
            print(f"raghub: plugin {plugin_name!r} is skipped: {problem}", file=sys.stderr)

    def register(self, plugin: Any, name: str, origin: str = RUN_TIME) -> None:
        """Register a plugin (a module or any object with hook implementations), each of its
        implementations guarded so that a failure is its own; one implementing a hook that does
        not exist is skipped."""
        misspelled = unknown_hooks(plugin)
        if misspelled:
            self.report_failure(name, f"{', '.join(misspelled)} is not a raghub hook "
                                      f"(the hooks: {', '.join(sorted(HOOK_NAMES))})")
            return
        self.pm.register(_Guarded(plugin, name, self), name)
        self.origins[name] = origin
        self._registry = None

    def unregister(self, name: str) -> None:
        """Drop a plugin and everything it registered."""
        self.pm.unregister(name=name)
        self._registry = None

    def plugin(self, name: str) -> Any:
        """The plugin registered as `name` (None if there is none)."""
        guarded = self.pm.get_plugin(name)
        return guarded and guarded.plugin

    def load(self) -> None:
        """Register the built-in plugins, then the third-party entry points (once)."""
        if self._loaded:
            return
        self._loaded = True
        for name in DEFAULT_PLUGINS:
            self.register(importlib.import_module(name), name, BUILTIN)
        allowed = os.environ.get("RAGHUB_LOAD_PLUGINS")
        allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        for entry_point in importlib.metadata.entry_points(group="raghub"):
            if allowed_names is None or entry_point.name in allowed_names:
                self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        distribution = f"{entry_point.dist.name} {entry_point.dist.version}" if entry_point.dist else "unknown"
        name = entry_point.name
        if self.pm.get_plugin(name) is not None:  # two distributions chose one name: keep both
            name = f"{entry_point.name} ({distribution})"
            print(f"raghub: plugin name {entry_point.name!r} is used by {self.origins[entry_point.name]} "
                  f"and {distribution}; the second is listed as {name!r}", file=sys.stderr)
        if entry_point.dist:
            self.distributions[name] = entry_point.dist
        try:
            with contextlib.redirect_stdout(sys.stderr):
                module = entry_point.load()
        except (Exception, SystemExit) as error:  # a broken plugin must not stop the others
            self.report_failure(name, f"failed to load: {type(error).__name__}: {error}")
            return
        self.register(module, name, distribution)

    def origin_of(self, plugin_name: str) -> str:
        """'built-in' or 'distribution version' for a registered plugin name."""
        return self.origins.get(plugin_name, RUN_TIME)

    def call_hook(self, hook_name: str, **arguments: Any) -> list[str]:
        """Call a hook through pluggy (hook wrappers wrap the call) until no implementation
        fails: a plugin whose implementation raises or returns a value is named, unregistered,
        and the hook called again without it. Returns the names of the plugins that failed."""
        self.load()
        failed = []
        while True:
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    getattr(self.pm.hook, hook_name)(**arguments)
                return failed
            except PluginFailed as failure:
                self.report_failure(failure.plugin_name, failure.problem)
                self.unregister(failure.plugin_name)
                failed.append(failure.plugin_name)

    def _guarded(self, plugin_name: str, hook_name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function`, a hook implementation, reporting a failure as its plugin's `PluginFailed`
        and noting whose implementation runs (`calling`)."""
        argnames = ", ".join(inspect.signature(function).parameters)

        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> None:
            self.calling = plugin_name
            try:
                returned = function(*args, **kwargs)
            except (Exception, SystemExit) as error:
                raise PluginFailed(plugin_name, f"its {hook_name} failed: {type(error).__name__}: {error}") from error
            finally:
                self.calling = None
            if returned is not None:
                raise PluginFailed(plugin_name, f"its {hook_name} failed: UsageError: it returned {returned!r}; a "
                                                f"hook registers through its argument ({argnames}) and returns nothing")
        return guarded

    @property
    def registry(self) -> Registry:
        """Everything the loaded plugins registered. A later registration of a name wins (a
        third-party plugin can override a built-in); `origins` says which plugin did,
        `overrides` whom it replaced. A plugin that fails in any hook is unregistered and
        everything collected again without it, so nothing it registered remains."""
        while self._registry is None:
            found, failed = _collect(self)
            if not failed:
                self._registry = found
        return self._registry

    def code_identity(self, kind: str, name: str) -> dict[str, str]:
        """What identifies the code behind a registered name (e.g. "retriever", "bm25"): the
        name, version and installed-files record of its plugin's distribution when an installer
        put it in place from a built package; else (a built-in, a local module, an editable
        install, a plugin registered at run time) a hash of its source files. Computed once per
        process."""
        plugin_name = self.registry.providers[(kind, name)]
        distribution = self.distributions.get(plugin_name)
        if distribution is not None and _installed_from_a_build(distribution):
            return _distribution_identity(distribution)
        built_in = self.origin_of(plugin_name) == BUILTIN
        return {"source": _source_digest(_source_modules(self.pm.get_plugin(plugin_name), built_in))}

    def returned_wrong(self, plugin: Any, what: str) -> RunError:
        """The error for a plugin (a method, retriever, reranker, refiner or task) that returned
        what its contract forbids, naming it and where it came from: "method 'top1'
        (raghub-top1 0.1.0) returned WHAT"."""
        kind = next(kind for kind, (base, _) in DECLARATIONS.items() if isinstance(plugin, base))
        name = plugin.family if isinstance(plugin, Task) else plugin.name
        found = self.registry
        origin = found.origin(kind, name) if (kind, name) in found.origins else "not registered"
        return RunError(f"{kind} '{name}' ({origin}) returned {what}")

    def summaries(self) -> list[dict[str, Any]]:
        """One entry per loaded plugin: name, origin, hooks implemented."""
        self.load()
        summaries = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda pair: pair[0]):
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            summaries.append({"name": name, "origin": self.origin_of(name), "hooks": hooks})
        return summaries


class _Guarded:
    """A plugin as pluggy sees it: its hook implementations, each guarded
    (`PluginHost._guarded`); its wrappers as they are, to wrap the whole call."""

    def __init__(self, plugin: Any, name: str, host: PluginHost) -> None:
        self.plugin = plugin
        for attr in HOOK_NAMES:
            function = getattr(plugin, attr, None)
            options = getattr(function, "raghub_impl", None)
            if options is not None:
                wraps = options.get("wrapper") or options.get("hookwrapper")
                setattr(self, attr, function if wraps else host._guarded(name, attr, function))


def unknown_hooks(plugin: Any) -> list[str]:
    """Names of hook implementations in `plugin` that match no hookspec."""
    return sorted(attr for attr in dir(plugin)
                  if hasattr(getattr(plugin, attr), "raghub_impl") and attr not in HOOK_NAMES)


def _installed_from_a_build(distribution: importlib.metadata.Distribution) -> bool:
    """Whether an installer put the distribution in place (it wrote RECORD), not as an editable
    link to its source folder."""
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    return distribution.read_text("RECORD") is not None and not direct_url.get("dir_info", {}).get("editable")


@functools.cache
def _distribution_identity(distribution: importlib.metadata.Distribution) -> dict[str, str]:
    """The distribution's name and version, and a hash of RECORD (every installed file's
    checksum): a rebuilt package of an unchanged version is told apart too."""
    return {"distribution": distribution.name, "version": distribution.version,
            "record": fingerprint(distribution.read_text("RECORD"))}


def _source_modules(guarded: _Guarded, built_in: bool) -> tuple[str, ...]:
    """The modules whose source is a plugin's code: a built-in's own module (or package); the
    top-level package of any other plugin module, which holds the code it imports of its own;
    for an object registered at run time, the modules of its hooks; and the kits any of them
    use (`_kits_used`)."""
    plugin = guarded.plugin
    if isinstance(plugin, types.ModuleType):
        own = {plugin.__name__ if built_in else plugin.__name__.partition(".")[0]}
    else:
        own = {getattr(plugin, hook).__module__ for hook in HOOK_NAMES if hasattr(guarded, hook)}
    return tuple(sorted(own | _kits_used(own)))


def _kits_used(module_names: set[str]) -> set[str]:
    """The `raghub.kits` modules that the named modules (and their submodules), and the kits
    those use in turn, hold a name from: a fix to a kit is a change to the plugins it serves,
    whose cache entries it must not outlive. Read from the loaded modules, importing nothing."""
    found: set[str] = set()
    waiting = set(module_names)
    while waiting:
        name = waiting.pop()
        for module in [module for loaded, module in list(sys.modules.items())
                       if loaded == name or loaded.startswith(f"{name}.")]:
            for value in list(vars(module).values()):
                origin = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
                if isinstance(origin, str) and origin.startswith(f"{KITS}.") and origin not in found:
                    found.add(origin)
                    waiting.add(origin)
    return found


def core_identity() -> dict[str, str]:
    """What identifies raghub's own code, which every plugin runs inside: a hash of its source."""
    return {"source": _source_digest(("raghub",))}


@functools.cache
def _source_digest(module_names: tuple[str, ...]) -> str:
    """A hash of the modules' source: every .py file of a package, a module's file."""
    files: list[Path] = []
    for module in map(sys.modules.__getitem__, module_names):
        if hasattr(module, "__path__"):
            files += sorted(path for folder in module.__path__ for path in Path(folder).rglob("*.py"))
        elif getattr(module, "__file__", None):
            files.append(Path(module.__file__))
    return fingerprint([file_sha256(file) for file in files])


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


def _collect(host: PluginHost) -> tuple[Registry, list[str]]:
    """What every registered plugin registers, and the plugins that failed doing it. Each
    registration is checked as it is made, and entered in the order the plugins were
    registered (pluggy calls the last one first), so that a later one wins."""
    found = Registry()
    registered: list[tuple[str, dict, str, str, Any]] = []

    def note(table: dict, kind: str, name: str, value: Any) -> None:
        registered.append((host.calling, table, kind, name, value))

    def keyed(table: dict, kind: str, key_attr: str, options_are_flags: bool = True) -> Callable[[Any], None]:
        def add(cls: Any) -> None:
            check_declarations(cls, kind, key_attr)
            name = getattr(cls, key_attr)
            shadowed = sorted(set(getattr(cls, "options", {})) & RESERVED_NAMES) if options_are_flags else []
            if shadowed:
                raise UsageError(f"its {kind} '{name}' declares option(s) {', '.join(shadowed)}, "
                                 "which are raghub's own settings")
            note(table, kind, name, cls)
        return add

    def add_task(definition: dict) -> None:
        if not isinstance(definition, dict):
            raise UsageError(f"it registered {definition!r} as a task definition, which must be a dict "
                             "(as raghub.read_task_definition returns)")
        for key in ("name", "family"):
            if key not in definition:
                raise UsageError(f"a task definition lacks '{key}'")
        check_name_and_family(definition, definition.get("source", "a task definition"))
        note(found.tasks, "task", definition["name"], definition)

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
        failed += host.call_hook(hook_name, register=add)
    order = {name: index for index, (name, _) in enumerate(host.pm.list_name_plugin())}
    for plugin_name, table, kind, name, value in sorted(registered, key=lambda entry: order.get(entry[0], -1)):
        origin = host.origin_of(plugin_name)
        if (kind, name) in found.origins and found.origins[(kind, name)] != origin:
            found.overrides[(kind, name)] = found.origins[(kind, name)]
        table[name] = value
        found.origins[(kind, name)] = origin
        found.providers[(kind, name)] = plugin_name
    return found, failed


@functools.cache
def default_host() -> PluginHost:
    """The host of code that runs outside the CLI and is given none (a script, a benchmark):
    one per process, made on first use."""
    return PluginHost()
