"""The `raghub` command line: run, leaderboard, plot, plugins, tasks, methods, retrievers, rerankers,
refiners, models, samples, compare, score, judge.

The core settings (`raghub.settings.CORE_OPTIONS`) and every option the installed plugins
declare (a method's `--temperature`, a task's `--split`, ...) become `raghub run` flags; flags
and `--config` keys are converted by the same declarations. Plugins may add whole commands.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raghub import allocator
from raghub.errors import RaghubError, UsageError
from raghub.options import Option, dashed
from raghub.plots import KINDS, plot as draw_plot
from raghub.interfaces import Registry
from raghub.plugin_manager import PluginHost
from raghub.leaderboard import leaderboard_markdown
from raghub.record import Record
from raghub.records import find_record, read_records, read_samples
from raghub.settings import CORE_OPTIONS, read_yaml_mapping


class BadInput(click.ClickException):
    """A one-line error; exit code 2 for bad input (like click's usage errors), else 1."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RaghubGroup(click.Group):
    """Turns raghub's errors into one line and their exit code, and Ctrl-C into exit 130. Each
    invocation gets its own `PluginHost` (`ctx.obj`, unless the caller gives one), whose
    plugins' commands join raghub's own."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        if parent is None and extra.get("obj") is None:
            extra["obj"] = PluginHost()
        ctx = super().make_context(info_name, args, parent, **extra)  # --version exits here, loading nothing
        try:
            ctx.obj.load()
        except KeyboardInterrupt:  # while plugins import: start-up's, not a run's (click would exit 1)
            click.echo("raghub: interrupted", err=True)
            sys.exit(130)
        return ctx

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_plugin_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _plugin_commands(ctx).get(name) or self.commands.get(name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RaghubError as error:
            raise BadInput(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            click.echo("interrupted: finished examples are kept; run the same command again to "
                       "resume", err=True)
            sys.exit(130)


class PluginCommands(click.Group):
    """What the plugins' `register_commands` hooks add: a command may be added again by the
    plugin that added it, never one named like raghub's own or another plugin's."""

    def __init__(self, taken: set[str], host: PluginHost) -> None:
        super().__init__("raghub")
        self.taken, self.host = taken, host
        #: command name -> the plugin that added it
        self.added_by: dict[str, str | None] = {}

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        if name in self.taken or self.added_by.get(name, self.host.calling) != self.host.calling:
            raise UsageError(f"its command '{name}' would replace `raghub {name}`; it needs another name")
        super().add_command(cmd, name)
        self.added_by[name] = self.host.calling


def _plugin_commands(ctx: click.Context) -> dict[str, click.Command]:
    """The invocation's plugin commands, collected once. A plugin whose command would replace
    another (raghub's or an earlier plugin's) is skipped like a plugin whose hook fails: named,
    unregistered, and the commands it added removed."""
    root = ctx.find_root()
    if "raghub.commands" not in root.meta:
        commands = PluginCommands(set(root.command.commands), root.obj)
        for plugin in root.obj.call_hook("register_commands", cli=commands):
            for name in [name for name, by in commands.added_by.items() if by == plugin]:
                del commands.commands[name]
        root.meta["raghub.commands"] = commands.commands
    return root.meta["raghub.commands"]


def pass_registry(command: Any) -> Any:
    """Call a command with the invocation's registry as its first argument."""
    @functools.wraps(command)
    def with_registry(*args: Any, **kwargs: Any) -> Any:
        return command(click.get_current_context().obj.registry, *args, **kwargs)
    return with_registry


@click.group(cls=RaghubGroup)
@click.version_option(package_name="raghub")
def cli() -> None:
    """raghub: run retrieval-augmented generation methods on comparable tasks."""
    allocator.keep_freed_memory()


def _declared_options(found: Registry) -> dict[str, list[tuple[Option, list[str]]]]:
    """Every option a registered task family, method, retriever, reranker or refiner declares:
    per name, each distinct declaration with the plugins that declare it so."""
    declared: dict[str, list[tuple[Option, list[str]]]] = {}
    plugins = [*(("task family", c.family, c) for c in found.task_families.values()),
               *(("method", c.name, c) for c in found.methods.values()),
               *(("retriever", c.name, c) for c in found.retrievers.values()),
               *(("reranker", c.name, c) for c in found.rerankers.values()),
               *(("refiner", c.name, c) for c in found.refiners.values())]
    for kind, name, cls in plugins:
        for key, option in cls.options.items():
            declarations = declared.setdefault(key, [])
            owners = next((owners for declared_as, owners in declarations if declared_as == option), None)
            if owners is None:
                declarations.append((option, owners := []))
            owners.append(f"{kind} {name}")
    return declared


#: how `--help` names the value an option of each type takes (the flags keep their text, for
#: `Option.convert` to check like a config file's)
HELP_TYPES = {int: "INTEGER", float: "FLOAT", str: "TEXT"}


def _option_help(option: Option, owners: list[str]) -> str:
    """One declaration's help, with who declares it and its default, e.g. 'seed [method x; default: 42]'."""
    notes = [", ".join(owners)] if owners else []
    if option.default not in (None, ""):
        notes.append(f"default: {option.default}")
    return f"{option.help} [{'; '.join(notes)}]" if notes else option.help


def _option_flags(options: dict[str, list[tuple[Option, list[str]]]]) -> list[click.Option]:
    """A flag per option name, its help naming each plugin's declaration apart (two plugins may
    mean different things by one name); values stay as given, for `RunRequest` to convert."""
    flags = []
    for key, declarations in sorted(options.items()):
        help_text = " | ".join(_option_help(option, owners) for option, owners in declarations)
        option = declarations[0][0]
        if all(declared.type is bool for declared, _ in declarations):
            flags.append(click.Option([f"--{dashed(key)}", key], is_flag=True, default=None, help=help_text))
        else:  # choices and numbers are checked by Option.convert, for one-line errors like a config's
            one_kind = len(declarations) == 1 or all(declared.type == option.type for declared, _ in declarations)
            metavar = (f"[{'|'.join(option.type)}]" if isinstance(option.type, tuple) and len(declarations) == 1
                       else HELP_TYPES.get(option.type, "TEXT") if one_kind else "VALUE")
            flags.append(click.Option([f"--{dashed(key)}", key], metavar=metavar, default=None, help=help_text,
                                      envvar="RAGHUB_DATA_DIR" if key == "data_dir" else None))
    return flags


class RunCommand(click.Command):
    """`raghub run`: its own flags, then the core settings' and every option the invocation's
    plugins declare."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        found = ctx.find_root().obj.registry
        options = {**{key: [(option, [])] for key, option in CORE_OPTIONS.items()}, **_declared_options(found)}
        help_option = self.get_help_option(ctx)
        return [*self.params, *_option_flags(options), *([help_option] if help_option else [])]


def _run_settings(config_file: str | None, given: dict[str, Any], found: Registry) -> dict[str, Any]:
    """The `--config` file's settings overlaid with the flags given. A setting that neither
    raghub nor any installed plugin declares is a UsageError naming the file and the key."""
    settings: dict[str, Any] = {}
    if config_file:
        known = [*CORE_OPTIONS, *_declared_options(found)]
        for key, value in read_yaml_mapping(config_file).items():
            if not isinstance(key, str):
                raise UsageError(f"{config_file}: setting names must be strings, not {key!r}")
            if key.replace("-", "_") not in known:
                close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UsageError(f"{config_file}: unknown setting '{key}'{hint}; see `raghub run --help`")
            settings[key.replace("-", "_")] = value
    settings.update({key: value for key, value in given.items() if value is not None})
    return settings


def _record_title(record: Record) -> str:
    """E.g. 'squad · incontext · bm25 k=3'."""
    return (f"{record.task} · {record.method}"
            + (f" · {record.retriever} k={record.n_docs}" if record.retriever else ""))


def _print_record(record: Record, results_dir: Path) -> None:
    """The record's metrics as a table, then one line of what was run (wrapped only between words)."""
    table = Table(title=_record_title(record))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in record.metrics.items():
        if isinstance(value, (int, float)):
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    n = record.n_examples
    console.print(f"{n} example{'' if n == 1 else 's'} · {record.model or 'no model run'} · stored in {results_dir}",
                  style="dim", soft_wrap=True, markup=False, highlight=False)


def _existing_results_dir(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A results folder to read: a UsageError (one line, exit 2) when it does not exist."""
    if not Path(value).is_dir():
        raise UsageError(f"--results-dir {value} is not a folder of results; give the folder "
                         "`raghub run --results-dir` stored into")
    return value


#: where the commands that read stored results look
RESULTS_DIR_OPTION = click.option("--results-dir", default="results", show_default=True,
                                  callback=_existing_results_dir)


@cli.command(cls=RunCommand)
@click.option("--config", "config_file", type=click.Path(),  # read_yaml_mapping checks it
              help="YAML file of settings (any option of this command); flags override it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print each record as one line of JSON on stdout, nothing else.")
@click.option("--force", is_flag=True,
              help="Run again even when an identical run is stored, recomputing everything it had cached.")
@click.option("--verbose", is_flag=True,
              help="Show the libraries' progress bars, advisory logging and deprecation warnings.")
@click.pass_obj
def run(host: PluginHost, config_file: str | None, as_json: bool, force: bool, verbose: bool, **given: Any) -> None:
    """Run a method on a task and store one result record; comma lists of --task, --method and
    --n-docs run every combination, loading each model once."""
    from raghub.quiet import quiet_third_party
    from raghub.resolution import resolve_sweep
    from raghub.runner import run_sweep

    quiet_third_party(verbose)

    runs = resolve_sweep(_run_settings(config_file, given, host.registry), host)
    if not as_json:
        for record, resolved in zip(run_sweep(runs, force=force), runs):
            _print_record(record, resolved.request.results_dir)
        return
    with _stdout_for_records_only() as records:
        for record in run_sweep(runs, force=force):
            click.echo(json.dumps(record.to_dict(), sort_keys=True), file=records)


@contextlib.contextmanager
def _stdout_for_records_only() -> Iterator[TextIO]:
    """Meanwhile, whatever else writes to stdout (a plugin's print, a C library, a child process)
    goes to stderr; yields the stream the records go to."""
    records = sys.stdout
    try:
        descriptors = records.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stdout (tests): Python's writes only
        with contextlib.redirect_stdout(sys.stderr):
            yield records
        return
    records.flush()
    saved = os.dup(descriptors[0])
    os.dup2(descriptors[1], descriptors[0])
    try:
        with open(saved, "w", encoding=records.encoding, closefd=False) as stream, \
                contextlib.redirect_stdout(sys.stderr):
            yield stream
    finally:
        records.flush()  # what was buffered for stdout meanwhile still goes to stderr
        os.dup2(saved, descriptors[0])
        os.close(saved)


@cli.command()
@RESULTS_DIR_OPTION
@click.option("--task", "tasks", multiple=True, help="Only this task (repeat for several).")
@click.option("--by-type", is_flag=True, help="Add per-question-type tables where records have them.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the markdown to this file.")
def leaderboard(results_dir: str, tasks: tuple[str, ...], by_type: bool, output: str | None) -> None:
    """A markdown table of every stored result; a best value is bold only when it beats the
    runner-up by more than their combined standard error."""
    records = read_records(results_dir)
    markdown = leaderboard_markdown(records, tasks=tasks, by_type=by_type)
    if output:
        try:
            Path(output).write_text(markdown, encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--output {output} cannot be written ({error.strerror}); give a file "
                             "in an existing folder you can write to") from None
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(markdown, nl=False)


@cli.command()
@RESULTS_DIR_OPTION
@click.option("--kind", type=click.Choice(KINDS), default="lines", show_default=True,
              help="lines: the metric against n_docs per method for one task; bars: the metric per "
                   "task (dataset) and method.")
@click.option("--task", "tasks", multiple=True, help="Only this task (repeat for several bars).")
@click.option("--metric", help="The metric drawn (default: the first one the records rank).")
@click.option("--output", type=click.Path(dir_okay=False),
              help="A .png or .svg file (default: TASK-METRIC.png in the results folder).")
def plot(results_dir: str, kind: str, tasks: tuple[str, ...], metric: str | None, output: str | None) -> None:
    """Draw stored results, with standard-error bars where the records have them."""
    path = draw_plot(read_records(results_dir), kind, tasks, metric, output, results_dir)
    click.echo(f"wrote {path}", err=True)


def _listing(title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def plugins(host: PluginHost, as_json: bool) -> None:
    """Installed plugins, where they came from, and the hooks they implement."""
    summaries = host.summaries()
    failed_plugins = host.failed
    if as_json:
        click.echo(json.dumps({"plugins": summaries, "failed": failed_plugins}, indent=2))
        return
    _listing("raghub plugins",
             [*((s["name"], s["origin"], ", ".join(s["hooks"])) for s in summaries),
              *((name, "[red]skipped[/red]", problem) for name, problem in failed_plugins.items())],
             ("plugin", "origin", "hooks"))


@cli.command()
@pass_registry
def tasks(found) -> None:
    """Registered tasks."""
    _listing("raghub tasks", [(name, d["family"], found.origin("task", name), d.get("description", ""))
                              for name, d in sorted(found.tasks.items())],
             ("task", "family", "origin", "description"))


@cli.command("task-yaml")
@pass_registry
def task_yaml(found) -> None:
    """The task YAML reference: every key of each task family, written from the schemas."""
    from raghub.task_yaml import task_yaml_reference

    click.echo(task_yaml_reference(found.task_families), nl=False)


def _plugin_listing(found: Registry, title: str, kind: str, table: dict[str, type]) -> None:
    _listing(title, [(name, found.origin(kind, name), cls.description,
                      ", ".join(f"--{dashed(k)}" for k in cls.options))
                     for name, cls in sorted(table.items())],
             (kind, "origin", "description", "options"))


@cli.command()
@pass_registry
def methods(found) -> None:
    """Registered methods and their options."""
    _plugin_listing(found, "raghub methods", "method", found.methods)


@cli.command()
@pass_registry
def retrievers(found) -> None:
    """Registered retrievers and their options."""
    _plugin_listing(found, "raghub retrievers", "retriever", found.retrievers)


@cli.command()
@pass_registry
def rerankers(found) -> None:
    """Registered rerankers (`--reranker`) and their options."""
    _plugin_listing(found, "raghub rerankers", "reranker", found.rerankers)


@cli.command()
@pass_registry
def refiners(found) -> None:
    """Registered refiners (`--refiner`) and their options."""
    _plugin_listing(found, "raghub refiners", "refiner", found.refiners)


@cli.command()
@pass_registry
def models(found) -> None:
    """Registered model backends, what each loads, and its --model-args keys."""
    _listing("raghub models", [(name, found.origin("model backend", name), cls.handles_description,
                                ", ".join(cls.options))
                               for name, cls in sorted(found.models.items())],
             ("backend", "origin", "loads", "--model-args keys"))


# --- inspecting results ------------------------------------------------------------------------

def _stored_run(results_dir: str, reference: str) -> tuple[Record, list[dict[str, Any]]]:
    """A record (by id, the start of one, or `latest`) and its samples log."""
    record = find_record(results_dir, reference)
    return record, read_samples(results_dir, record)


def _cell(value: Any) -> str:
    """A value as table text: floats to 4 decimals, None as '–', lists joined by ' | '."""
    if value is None:
        return "–"
    if isinstance(value, list):
        return " | ".join(_cell(item) for item in value)
    return escape(f"{value:.4f}" if isinstance(value, float) else str(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _passage_text(passage: dict[str, Any]) -> str:
    """'rank. title-or-id (score)', with 'was first-rank (first-score)' when a reranker moved
    it, marked when gold, then its first words when logged."""
    moved = f" was {passage['first_rank']} ({passage['first_score']:.2f})" if "first_rank" in passage else ""
    start = f"\n   {escape(passage['text_start'])}" if passage.get("text_start") else ""
    return (f"{passage['rank']}. {escape(passage['title'] or passage['id'])} ({passage['score']:.2f}){moved}"
            + (" [green]gold[/green]" if passage.get("gold") else "") + start)


def _sample_row(line: dict[str, Any]) -> tuple[str, str, str, str]:
    """A samples-log line as (id, its text fields, its numbers, its passages): the first-stage
    ones, then each query the method asked with what came back."""
    fields = {key: value for key, value in line.items() if key not in ("id", "retrieved", "retrievals")}
    texts = [f"[bold]{key}[/bold] {_cell(value)}" for key, value in fields.items() if not _is_number(value)]
    numbers = [f"{key} {_cell(value)}" for key, value in fields.items() if _is_number(value)]
    passages = [_passage_text(p) for p in line.get("retrieved", [])]
    for call in line.get("retrievals", []):
        passages.append(f"[bold]asked {call['step']}[/bold] {escape(call['query'])}")
        passages += [f"  {_passage_text(p)}" for p in call["hits"]] or ["  (nothing)"]
    return escape(line["id"]), "\n".join(texts), "\n".join(numbers), "\n".join(passages)


@cli.command()
@click.argument("reference", metavar="RECORD")
@click.option("--wrong", is_flag=True, help="Only the examples with EM 0 (question answering).")
@click.option("--type", "example_type", help="Only the examples of this question type.")
@click.option("--changed-against", "against", metavar="B",
              help="Only the examples right in one of the two runs and wrong in the other (by --metric), "
                   "with B's prediction and which way it changed.")
@click.option("--metric", default="em", show_default=True, help="The right / wrong metric of --changed-against.")
@RESULTS_DIR_OPTION
@pass_registry
def samples(found, reference: str, wrong: bool, example_type: str | None, against: str | None,
            metric: str, results_dir: str) -> None:
    """A run's examples, one row each (RECORD: a record id, the start of one, or `latest`)."""
    record, lines = _stored_run(results_dir, reference)
    shown = lines if against is None else _changed(found, record, lines, *_stored_run(results_dir, against), metric)
    if wrong:
        if not any("em" in line for line in lines):
            raise UsageError(f"--wrong keeps the examples with EM 0, and record {record.id} "
                             f"({record.task}) has no EM")
        shown = [line for line in shown if line.get("em") == 0]
    if example_type is not None:
        shown = [line for line in shown if line.get("type") == example_type]
    table = Table(title=f"{record.id}: {_record_title(record)}", show_lines=True,
                  caption=f"{len(shown)} of {len(lines)} examples")
    for column in ("id", "example", "scores", "retrieved"):
        table.add_column(column, overflow="fold")
    for line in shown:
        table.add_row(*_sample_row(line))
    Console().print(table)


def _changed(found, record: Record, lines: list[dict[str, Any]], record_b: Record,
             lines_b: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The lines of the examples whose `metric` retrieval fixed or broke against run B, each
    with how it changed and B's prediction."""
    from raghub.comparison import outcomes, paired_lines

    shared = paired_lines(record, lines, record_b, lines_b)
    by_id = outcomes(shared, metric, _metric_terms(found, record))
    if by_id is None:
        raise UsageError(f"--metric {metric} does not score each example of records {record.id} and "
                         f"{record_b.id} right (1) or wrong (0); give one that does, such as em or match")
    return [{**a, "changed": CHANGES[by_id[a["id"]]], "B prediction": b.get("prediction")}
            for a, b in shared if by_id.get(a["id"]) in ("fixed", "broke")]


def _metric_terms(found, record: Record):
    """Each example's (y, x) per ratio metric: its task family's `metric_terms` and, in a judged
    run, its judge's accuracy."""
    from raghub.judging import judged_terms

    family = found.task_families.get(record.family)
    if family is None:
        raise UsageError(f"no installed plugin provides the task family '{record.family}'")
    return lambda line: {**family.metric_terms(line), **judged_terms(line)}


@cli.command()
@click.argument("reference_a", metavar="A")
@click.argument("reference_b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON, nothing else.")
@RESULTS_DIR_OPTION
@pass_registry
def compare(found, reference_a: str, reference_b: str, as_json: bool, results_dir: str) -> None:
    """Two runs of a task, paired example by example: the difference A − B of each metric, its
    paired standard error, and the examples A does better / worse / the same on."""
    from raghub.comparison import compare_runs

    record_a, samples_a = _stored_run(results_dir, reference_a)
    record_b, samples_b = _stored_run(results_dir, reference_b)
    comparison = compare_runs(record_a, samples_a, record_b, samples_b, _metric_terms(found, record_a))
    if comparison["differences"]:
        click.echo(f"raghub: warning: A and B differ in more than the method: "
                   f"{'; '.join(comparison['differences'])}", err=True)
    if as_json:
        click.echo(json.dumps(comparison, sort_keys=True))
        return
    console = Console()
    console.print(f"A  {record_a.id}  {_record_title(record_a)}\n"
                  f"B  {record_b.id}  {_record_title(record_b)}\n"
                  f"paired on the {comparison['n_shared']} examples both ran "
                  f"(A ran {comparison['n_a']}, B ran {comparison['n_b']})", highlight=False)
    table = Table()
    table.add_column("metric", min_width=max(map(len, comparison["metrics"]), default=6))
    for column in ("A", "B", "A − B", "se", "A wins", "B wins", "ties"):
        table.add_column(column, justify="right")
    for name, row in comparison["metrics"].items():
        table.add_row(name, *(_cell(row[key]) for key in ("a", "b", "difference", "se", "wins", "losses", "ties")))
    console.print(table)
    for name, row in comparison["metrics"].items():
        if "outcomes" in row:
            _print_outcomes(console, name, row["outcomes"])


#: the outcome columns of `raghub compare`'s right / wrong tables
OUTCOME_COLUMNS = {"both right": "both right", "fixed": "fixed", "broke": "broke", "both wrong": "both wrong"}
#: what fixed and broke mean, below the table and in `raghub samples --changed-against`
CHANGES = {"fixed": "retrieval fixed (A right, B wrong)", "broke": "retrieval broke (A wrong, B right)"}
#: the example ids a right / wrong table names per outcome (all of them in --json)
SHOWN_OUTCOME_IDS = 8


def _print_outcomes(console: Console, name: str, outcomes: dict[str, Any]) -> None:
    """One metric's right / wrong table: a row per split of what A retrieved, then the first
    ids retrieval fixed and broke."""
    table = Table(title=f"{name}: right / wrong in A and B, by A's passages")
    table.add_column("A retrieved")
    for column in OUTCOME_COLUMNS.values():
        table.add_column(column, justify="right")
    for split, counts in outcomes["splits"].items():
        table.add_row(split, *(str(counts[key]) for key in OUTCOME_COLUMNS))
    console.print(table)
    for outcome in ("fixed", "broke"):
        ids = outcomes[outcome]
        shown = ", ".join(ids[:SHOWN_OUTCOME_IDS]) + (", ..." if len(ids) > SHOWN_OUTCOME_IDS else "")
        console.print(f"{CHANGES[outcome]}: {len(ids)}, {shown or 'none'}", highlight=False, markup=False)


def _judge_options(default: str | None):
    """A decorator adding the flags that choose an LLM judge and how often it judges; `default`
    is the judge when --judge is not given (None: no judging)."""
    options = [
        click.option("--judge", "judge_name", default=default, show_default=default is not None,
                     help="The judge (a register_judges plugin, e.g. correctness)."),
        click.option("--judge-model", help="The judge's model: any --model spec (default: the embedded model)."),
        click.option("--judge-repeats", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Judgements per question (over the judge's paraphrased prompts)."),
        click.option("--judge-temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0: each verdict is p(yes) > 1/2; above 0: drawn from the judge's yes / no at it."),
    ]

    def add(command):
        for option in reversed(options):
            command = option(command)
        return command
    return add


@cli.command()
@click.argument("predictions", type=click.Path(dir_okay=False))
@click.option("--task", "task_spec", required=True, help="Task name or task YAML the predictions answer.")
@click.option("--system", help="The name the predictions' system gets in the record and leaderboard "
                               "(default: the file's name without its suffix).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the task's first N questions.")
@click.option("--data-dir", envvar="RAGHUB_DATA_DIR", help=CORE_OPTIONS["data_dir"].help)
@_judge_options(default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the record as one line of JSON, nothing else.")
@click.option("--results-dir", default="results", show_default=True, help="Results store.")
@click.pass_obj
def score(host: PluginHost, predictions: str, task_spec: str, system: str | None, limit: int | None, data_dir: str | None,
          judge_name: str | None, judge_model: str | None, judge_repeats: int, judge_temperature: float,
          as_json: bool, results_dir: str) -> None:
    """Score answers made by another system (PREDICTIONS: one JSON line per question, its `id`,
    `prediction` and optionally `retrieved` passage ids) with the task's metrics, and store them
    as a record and samples log; with --judge, then the judged run as `raghub judge` does."""
    from raghub.judging import check_judge, judge_run
    from raghub.scoring import score_predictions

    if judge_name is not None:
        check_judge(host, judge_name, judge_model)
    path = Path(predictions)
    record = score_predictions(host, task_spec, path, system or path.name.split(".")[0], Path(results_dir),
                               data_dir, limit)
    if judge_name is not None:
        record = judge_run(host, record, read_samples(results_dir, record), judge_name, judge_model,
                           judge_repeats, judge_temperature, results_dir)
    if as_json:
        click.echo(json.dumps(record.to_dict(), sort_keys=True))
    else:
        _print_record(record, Path(results_dir))


@cli.command()
@click.argument("reference", metavar="RECORD")
@_judge_options(default="correctness")
@click.option("--json", "as_json", is_flag=True, help="Print the judged record as one line of JSON, nothing else.")
@RESULTS_DIR_OPTION
@click.pass_obj
def judge(host: PluginHost, reference: str, judge_name: str, judge_model: str | None, judge_repeats: int,
          judge_temperature: float, as_json: bool, results_dir: str) -> None:
    """Judge a stored QA run's predictions with an LLM judge (no generator runs) and store the
    judged run as a new record: judged accuracy ± se (the judge's variance included), the
    judge's self-agreement, and Cohen's kappa against match and EM."""
    from raghub.judging import judge_run

    record, lines = _stored_run(results_dir, reference)
    judged = judge_run(host, record, lines, judge_name, judge_model, judge_repeats, judge_temperature, results_dir)
    if as_json:
        click.echo(json.dumps(judged.to_dict(), sort_keys=True))
    else:
        _print_record(judged, Path(results_dir))
