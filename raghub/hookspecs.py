"""The hooks through which every task, method, retriever, reranker, refiner, model backend,
training objective, judge and command is registered.

Built-in plugins (`raghub.plugin_manager.DEFAULT_PLUGINS`) and third-party packages
(entry-point group `raghub`) implement exactly these hooks; each hands the plugin a `register`
callback.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("raghub")
hookimpl = HookimplMarker("raghub")


@hookspec
def register_task_families(register):
    """Register Task subclasses: `register(TaskClass)`, keyed by `TaskClass.family`."""


@hookspec
def register_tasks(register):
    """Register task definitions: `register(definition)`, a dict as a task YAML holds it, which
    `raghub.read_task_definition(path)` reads (following `include:`). Its `name` and `family`
    (the `Task.family` that runs it) are required strings; `description`, `retriever`, `n_docs`,
    `version` and `source` (the file it was read from, which errors name) are optional for every
    family, and the rest are the keys of the family's `Task.definition_schema`, checked when the
    task is run (`raghub task-yaml` lists them). A plugin's YAML may `include: _qa.yaml` (raghub's
    shared defaults) and name data files it ships with `data: {package: ITS_PACKAGE, file: ...}`."""


@hookspec
def register_methods(register):
    """Register methods: `register(MethodClass)`, keyed by `MethodClass.name`."""


@hookspec
def register_retrievers(register):
    """Register retrievers: `register(RetrieverClass)`, keyed by `RetrieverClass.name`."""


@hookspec
def register_rerankers(register):
    """Register rerankers (`--reranker NAME`): `register(RerankerClass)`, keyed by its `name` (a
    `raghub.Reranker` subclass)."""


@hookspec
def register_refiners(register):
    """Register refiners (`--refiner NAME`): `register(RefinerClass)`, keyed by its `name` (a
    `raghub.Refiner` subclass)."""


@hookspec
def register_models(register):
    """Register model backends: `register(ModelBackendClass)`, keyed by its `name`."""


@hookspec
def register_objectives(register):
    """Register training objectives of `raghub train`: `register(ObjectiveClass)`, keyed by its
    `name` (a `raghub.objectives.Objective` subclass)."""


@hookspec
def register_judges(register):
    """Register LLM judges of answers (`raghub judge --judge NAME`): `register(JudgeClass)`,
    keyed by its `name` (a `raghub.Judge` subclass)."""


@hookspec
def register_commands(cli):
    """Add click commands or groups to the `raghub` CLI group. A command finds the registry
    of the invocation's plugins with `click.get_current_context().obj.registry` (a
    `raghub.Registry`)."""
