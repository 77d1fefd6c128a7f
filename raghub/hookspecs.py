"""The hooks through which every task, method, retriever and command is registered.

Built-in plugins (`raghub.plugins.*`) and third-party packages (entry-point group `raghub`)
implement exactly these hooks; each hands the plugin a `register` callback.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("raghub")
hookimpl = HookimplMarker("raghub")


@hookspec
def register_task_families(register):
    """Register Task subclasses: `register(TaskClass)`, keyed by `TaskClass.family`."""


@hookspec
def register_tasks(register):
    """Register task definitions: `register(definition)`, a dict as read from a task YAML
    (at least `name` and `family`)."""


@hookspec
def register_augmenters(register):
    """Register methods: `register(AugmenterClass)`, keyed by `AugmenterClass.name`."""


@hookspec
def register_retrievers(register):
    """Register retrievers: `register(RetrieverClass)`, keyed by `RetrieverClass.name`."""


@hookspec
def register_commands(cli):
    """Add click commands or groups to the `raghub` CLI group."""
