"""The `raghub` command line: run, leaderboard, plugins, tasks, methods.

Plugin options (a method's `--temperature`, a task's `--split`, ...) are added to `raghub run`
from what the installed plugins declare; plugins may add whole commands too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from raghub.config import read_yaml_mapping
from raghub.interfaces import Option, UsageError, dashed
from raghub.plugin_manager import failed_plugins, plugin_summaries, pm, registry
from raghub.records import leaderboard_markdown, read_records
from raghub.runner import RunRequest, execute, resolve

CORE_RUN_SETTINGS = ("task", "method", "retriever", "n_docs", "model", "limit", "results_dir",
                     "data_dir", "batch_size", "device", "dtype")


class BadInput(click.ClickException):
    """A one-line error for bad input; exit code 2, like click's own usage errors."""

    exit_code = 2


class RaghubGroup(click.Group):
    """Turns raghub's UsageError into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as error:
            raise BadInput(str(error)) from None


@click.group(cls=RaghubGroup)
@click.version_option(package_name="raghub")
def cli() -> None:
    """raghub: run retrieval-augmented generation methods on comparable tasks."""


def _declared_options() -> dict[str, tuple[Option, list[str]]]:
    """Every option a registered task family, method or retriever declares, with its owners."""
    found = registry()
    declared: dict[str, tuple[Option, list[str]]] = {}
    plugins = [*(("task family", c.family, c) for c in found.task_families.values()),
               *(("method", c.name, c) for c in found.augmenters.values()),
               *(("retriever", c.name, c) for c in found.retrievers.values())]
    for kind, name, cls in plugins:
        for key, option in cls.options.items():
            first, owners = declared.setdefault(key, (option, []))
            owners.append(f"{kind} {name}")
    return declared


def _click_type(option: Option) -> Any:
    if isinstance(option.type, tuple):
        return click.Choice(option.type)
    return {int: click.INT, float: click.FLOAT, str: click.STRING}.get(option.type, click.STRING)


def _with_plugin_options(command):
    for key, (option, owners) in sorted(_declared_options().items(), reverse=True):
        help_text = f"{option.help} [{', '.join(owners)}; default: {option.default}]"
        if option.type is bool:
            decorator = click.option(f"--{dashed(key)}", key, is_flag=True, default=None, help=help_text)
        else:
            decorator = click.option(f"--{dashed(key)}", key, type=_click_type(option), default=None,
                                     help=help_text)
        command = decorator(command)
    return command


@cli.command()
@click.option("--task", help="Task name (see `raghub tasks`) or a task YAML file.")
@click.option("--method", help="Method name (see `raghub methods`).")
@click.option("--retriever", help="Retriever name (default: the task's, else bm25).")
@click.option("--n-docs", type=click.IntRange(min=0), help="Passages retrieved per example.")
@click.option("--model", help="Hub id, model folder or .gguf file (default: embedded SmolLM2-135M-Instruct).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N examples.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of settings (any option of this command); flags override it.")
@click.option("--results-dir", type=click.Path(file_okay=False), help="Results store [default: results].")
@click.option("--data-dir", envvar="RAGHUB_DATA_DIR", help="Local datasets folder [env: RAGHUB_DATA_DIR].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Examples per batch [default: 8].")
@click.option("--device", help="torch device [default: cuda if available, else cpu].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="[default: float32]")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON on stdout, nothing else.")
@_with_plugin_options
def run(config_file: str | None, as_json: bool, **given: Any) -> None:
    """Run a method on a task and store one result record."""
    settings: dict[str, Any] = {}
    if config_file:
        settings = {key.replace("-", "_"): value for key, value in read_yaml_mapping(config_file).items()}
    settings.update({key: value for key, value in given.items() if value is not None})
    for required in ("task", "method"):
        if not settings.get(required):
            raise UsageError(f"--{required} is required (on the command line or in --config)")
    core = {key: settings.pop(key) for key in CORE_RUN_SETTINGS if key in settings}
    request = RunRequest(**{**core, "results_dir": Path(core.get("results_dir", "results")),
                            "options": settings})
    resolved = resolve(request)
    try:
        record = execute(resolved)
    except KeyboardInterrupt:
        click.echo("interrupted: finished examples are kept; run the same command again to "
                   "resume", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
        return
    table = Table(title=f"{record['task']} · {record['method']}"
                  + (f" · {record['retriever']} k={record['n_docs']}" if record["retriever"] else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in record["metrics"].items():
        if isinstance(value, (int, float)):
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.caption = f"{record['n_examples']} examples · {record['model']} · stored in {request.results_dir}"
    Console().print(table)


@cli.command()
@click.option("--results-dir", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--task", "tasks", multiple=True, help="Only this task (repeat for several).")
@click.option("--by-type", is_flag=True, help="Add per-question-type tables where records have them.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the markdown to this file.")
def leaderboard(results_dir: str, tasks: tuple[str, ...], by_type: bool, output: str | None) -> None:
    """A markdown table of every stored result, best value per column in bold."""
    try:
        records = read_records(results_dir)
    except ValueError as error:
        raise UsageError(str(error)) from None
    markdown = leaderboard_markdown(records, tasks=tasks, by_type=by_type)
    if output:
        Path(output).write_text(markdown, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(markdown, nl=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """Installed plugins, where they came from, and the hooks they implement."""
    summaries = plugin_summaries()
    if as_json:
        click.echo(json.dumps({"plugins": summaries, "failed": failed_plugins}, indent=2))
        return
    table = Table(title="raghub plugins")
    for column in ("plugin", "origin", "hooks"):
        table.add_column(column)
    for summary in summaries:
        table.add_row(summary["name"], summary["origin"], ", ".join(summary["hooks"]))
    for name, error in failed_plugins.items():
        table.add_row(name, "[red]failed to load[/red]", error)
    console = Console()
    console.print(table)
    found = registry()
    console.print(f"retrievers: {', '.join(sorted(found.retrievers))}")


def _listing(title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@cli.command()
def tasks() -> None:
    """Registered tasks."""
    found = registry()
    _listing("raghub tasks", [(name, d["family"], found.origins[("task", name)], d.get("description", ""))
                              for name, d in sorted(found.tasks.items())],
             ("task", "family", "origin", "description"))


@cli.command()
def methods() -> None:
    """Registered methods (augmenters) and their options."""
    found = registry()
    _listing("raghub methods", [(name, found.origins[("method", name)], cls.description,
                                 ", ".join(f"--{dashed(k)}" for k in cls.options))
                                for name, cls in sorted(found.augmenters.items())],
             ("method", "origin", "description", "options"))


pm.hook.register_commands(cli=cli)
