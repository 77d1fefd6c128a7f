"""The `raghub` command line: run, leaderboard, plugins, tasks, methods, retrievers, models.

The core settings (`raghub.settings.CORE_OPTIONS`) and every option the installed plugins
declare (a method's `--temperature`, a task's `--split`, ...) become `raghub run` flags; flags
and `--config` keys are converted by the same declarations. Plugins may add whole commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from raghub.errors import RaghubError, UsageError
from raghub.options import Option, dashed
from raghub.plugin_manager import call_hook, failed_plugins, plugin_summaries, registry
from raghub.records import leaderboard_markdown, read_records
from raghub.settings import CORE_OPTIONS, read_yaml_mapping


class BadInput(click.ClickException):
    """A one-line error; exit code 2 for bad input (like click's usage errors), else 1."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RaghubGroup(click.Group):
    """Turns raghub's errors into one line and their exit code, and Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RaghubError as error:
            raise BadInput(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            click.echo("interrupted: finished examples are kept; run the same command again to "
                       "resume", err=True)
            sys.exit(130)


@click.group(cls=RaghubGroup)
@click.version_option(package_name="raghub")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """raghub: run retrieval-augmented generation methods on comparable tasks."""
    ctx.obj = registry()


def _declared_options() -> dict[str, tuple[Option, list[str]]]:
    """Every option a registered task family, method or retriever declares, with its owners."""
    found = registry()
    declared: dict[str, tuple[Option, list[str]]] = {}
    plugins = [*(("task family", c.family, c) for c in found.task_families.values()),
               *(("method", c.name, c) for c in found.methods.values()),
               *(("retriever", c.name, c) for c in found.retrievers.values())]
    for kind, name, cls in plugins:
        for key, option in cls.options.items():
            declared.setdefault(key, (option, []))[1].append(f"{kind} {name}")
    return declared


def _with_options(command, options: dict[str, tuple[Option, list[str]]]):
    """Add a flag per option; values stay as given, for `RunRequest` to convert."""
    for key, (option, owners) in sorted(options.items(), reverse=True):
        where = f"{', '.join(owners)}; " if owners else ""
        default = f"default: {option.default}" if option.default not in (None, "") else ""
        help_text = f"{option.help} [{where}{default}]" if where or default else option.help
        if option.type is bool:
            decorator = click.option(f"--{dashed(key)}", key, is_flag=True, default=None, help=help_text)
        else:  # choices are checked by Option.convert too, for one-line errors like a config's
            choices = f"[{'|'.join(option.type)}]" if isinstance(option.type, tuple) else None
            decorator = click.option(f"--{dashed(key)}", key, metavar=choices, default=None, help=help_text,
                                     envvar="RAGHUB_DATA_DIR" if key == "data_dir" else None)
        command = decorator(command)
    return command


def _with_run_options(command):
    """The core settings' flags, then every plugin option's."""
    return _with_options(command, {**{key: (option, []) for key, option in CORE_OPTIONS.items()},
                                   **_declared_options()})


def _run_settings(config_file: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The `--config` file's settings overlaid with the flags given."""
    settings: dict[str, Any] = {}
    if config_file:
        for key, value in read_yaml_mapping(config_file).items():
            if not isinstance(key, str):
                raise UsageError(f"{config_file}: setting names must be strings, not {key!r}")
            settings[key.replace("-", "_")] = value
    settings.update({key: value for key, value in given.items() if value is not None})
    return settings


def _print_record(record: dict[str, Any], results_dir: Path) -> None:
    table = Table(title=f"{record['task']} · {record['method']}"
                  + (f" · {record['retriever']} k={record['n_docs']}" if record["retriever"] else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in record["metrics"].items():
        if isinstance(value, (int, float)):
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.caption = f"{record['n_examples']} examples · {record['model']} · stored in {results_dir}"
    Console().print(table)


@cli.command()
@click.option("--config", "config_file", type=click.Path(),  # read_yaml_mapping checks it
              help="YAML file of settings (any option of this command); flags override it.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON on stdout, nothing else.")
@_with_run_options
def run(config_file: str | None, as_json: bool, **given: Any) -> None:
    """Run a method on a task and store one result record."""
    from raghub.runner import RunRequest, execute, resolve

    request = RunRequest.from_settings(_run_settings(config_file, given))
    record = execute(resolve(request))
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
    else:
        _print_record(record, request.results_dir)


@cli.command()
@click.option("--results-dir", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--task", "tasks", multiple=True, help="Only this task (repeat for several).")
@click.option("--by-type", is_flag=True, help="Add per-question-type tables where records have them.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the markdown to this file.")
def leaderboard(results_dir: str, tasks: tuple[str, ...], by_type: bool, output: str | None) -> None:
    """A markdown table of every stored result, best value per column in bold."""
    markdown = leaderboard_markdown(read_records(results_dir), tasks=tasks, by_type=by_type)
    if output:
        try:
            Path(output).write_text(markdown, encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--output {output} cannot be written ({error.strerror}); give a file "
                             "in an existing folder you can write to") from None
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(markdown, nl=False)


def _listing(title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """Installed plugins, where they came from, and the hooks they implement."""
    summaries = plugin_summaries()
    if as_json:
        click.echo(json.dumps({"plugins": summaries, "failed": failed_plugins}, indent=2))
        return
    _listing("raghub plugins",
             [*((s["name"], s["origin"], ", ".join(s["hooks"])) for s in summaries),
              *((name, "[red]skipped[/red]", problem) for name, problem in failed_plugins.items())],
             ("plugin", "origin", "hooks"))


@cli.command()
@click.pass_obj
def tasks(found) -> None:
    """Registered tasks."""
    _listing("raghub tasks", [(name, d["family"], found.origin("task", name), d.get("description", ""))
                              for name, d in sorted(found.tasks.items())],
             ("task", "family", "origin", "description"))


def _plugin_listing(title: str, kind: str, table: dict[str, type]) -> None:
    found = registry()
    _listing(title, [(name, found.origin(kind, name), cls.description,
                      ", ".join(f"--{dashed(k)}" for k in cls.options))
                     for name, cls in sorted(table.items())],
             (kind, "origin", "description", "options"))


@cli.command()
@click.pass_obj
def methods(found) -> None:
    """Registered methods and their options."""
    _plugin_listing("raghub methods", "method", found.methods)


@cli.command()
@click.pass_obj
def retrievers(found) -> None:
    """Registered retrievers and their options."""
    _plugin_listing("raghub retrievers", "retriever", found.retrievers)


@cli.command()
@click.pass_obj
def models(found) -> None:
    """Registered model backends, what each loads, and its --model-args keys."""
    _listing("raghub models", [(name, found.origin("model backend", name), cls.handles_description,
                                ", ".join(cls.options))
                               for name, cls in sorted(found.models.items())],
             ("backend", "origin", "loads", "--model-args keys"))


call_hook("register_commands", lambda _plugin: {"cli": cli})
