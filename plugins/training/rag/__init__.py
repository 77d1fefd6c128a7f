"""Training RAG: the objectives (`objectives`), the loss penalties (`penalties`), the training
loop (`trainer`) and the `raghub train` command (`command`)."""

from raghub import hookimpl

from .objectives import OBJECTIVES


@hookimpl
def register_objectives(register):
    for objective in OBJECTIVES:
        register(objective)


@hookimpl
def register_commands(cli):
    from .command import add_train_command

    add_train_command(cli)
