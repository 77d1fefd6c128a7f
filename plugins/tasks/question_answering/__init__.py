"""The `qa` task family: dataset readers (`formats`) and the task (`task`)."""

from raghub import hookimpl

from .task import QATask


@hookimpl
def register_task_families(register):
    register(QATask)
