"""Every setting checked in one place before the model loads: core settings and `--config`
files, task YAMLs, cross-option checks, plugin option clashes, `--model-args`, corpus files."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from raghub import Method, Option
from raghub.cli import cli
from raghub.corpus import read_corpus
from raghub.errors import RunError, UsageError
from raghub.hookspecs import hookimpl
from raghub.models import ModelBackend
from raghub.resolution import RunRequest, resolve, resolve_sweep
from raghub.schema import Field, check_schema
from raghub.settings import parse_key_values, read_task_definition

TASKS = Path(__file__).resolve().parents[1] / "tasks"


@pytest.fixture
def workdir(tmp_path, monkeypatch, host):
    """A fresh working directory (so the default `results/` lands in it) holding the shipped
    `_qa.yaml` and `_wikitext.yaml`, where no model backend may load a model."""
    for backend in {ModelBackend, *host.registry.models.values()}:
        monkeypatch.setattr(backend, "load", lambda *a, **k: pytest.fail("the model loaded"))
    for name in ("_qa.yaml", "_wikitext.yaml"):
        shutil.copy(TASKS / name, tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args):
    return CliRunner().invoke(cli, ["run", *args])


def error_line(result) -> str:
    """The one line of a bad-input exit (2) that wrote nothing."""
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert not Path("results").exists()
    return lines[0]


def write_config(settings: dict) -> str:
    """A `--config` file: a closed-book WikiText-2 run with `settings` on top."""
    settings = {"task": "wikitext2", "method": "none", **settings}
    Path("run.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return "run.yaml"


def request(**settings) -> RunRequest:
    return RunRequest.from_settings({"task": "wikitext2", "method": "none", **settings})


# --- --config files: converted and bounded by the declarations, as flags are ----------------

@pytest.mark.parametrize("setting, message", [
    ({"limit": "two"}, "--limit must be an int, not 'two'"),
    ({"task": 5}, "--task must be a string, not 5"),
    ({"results_dir": ["a", "b"]}, "--results-dir must be a string, not ['a', 'b']"),
    ({"batch_size": 0}, "--batch-size must be at least 1, not 0"),
    ({"dtype": "foo"}, "--dtype must be one of auto, float32, bfloat16, float16, not 'foo'"),
    ({"dtype": "float64"}, "--dtype must be one of auto, float32, bfloat16, float16, not 'float64'"),
    ({"n_docs": 2.5}, "--n-docs must be an int, not 2.5"),
    ({"limit": True}, "--limit must be an int, not True"),
    ({"limit": float("inf")}, "--limit must be an int, not inf"),
    # regression: a LoRA alpha of 0 trained adapters that change nothing, a negative one reversed them
    ({"task": "squad", "method": "parametric", "lora_alpha": 0}, "--lora-alpha must be above 0, not 0.0"),
    ({"task": "squad", "method": "rag-sequence", "temperature": float("inf")},
     "--temperature must be a finite float, not inf"),
    ({"temperatur": 1.0}, "run.yaml: unknown setting 'temperatur' (did you mean 'temperature'?)"),
    ({"n-dcos": 3}, "run.yaml: unknown setting 'n-dcos' (did you mean 'n_docs'?)"),
    ({"temperature": 1.0}, "--temperature is not an option of the selected task 'language-modelling', "
                           "method 'none'"),
    ({5: "x"}, "run.yaml: setting names must be strings, not 5"),
])
def test_a_bad_config_setting_exits_2_before_the_model_loads(workdir, setting, message):
    assert message in error_line(run_cli("--config", write_config(setting)))


@pytest.mark.parametrize("key, value", [
    ("batch_size", 0), ("dtype", "float64"), ("limit", "two"), ("n_docs", -1), ("split", "train"),
])
def test_a_config_value_fails_with_the_same_line_as_the_flag(workdir, key, value):
    from_flag = run_cli("--task", "wikitext2", "--method", "none", f"--{key.replace('_', '-')}", str(value))
    from_config = run_cli("--config", write_config({key: value}))
    assert error_line(from_config) == error_line(from_flag)


@pytest.fixture
def executed(monkeypatch):
    """The resolved runs `raghub run` executes; executing one only records it."""
    runs = []
    monkeypatch.setattr("raghub.runner.run_sweep", lambda resolved, force=False: runs.extend(resolved) or [])
    return runs


def test_a_flag_overrides_the_config_and_the_rest_of_the_config_applies(workdir, executed):
    config = write_config({"limit": "two", "batch-size": 2, "stride": None})
    result = run_cli("--config", config, "--limit", "3", "--json")
    assert result.exit_code == 0, result.output
    (run,) = executed
    assert (run.request.limit, run.request.batch_size) == (3, 2)
    assert run.plugin_options["task"] == {}  # `stride: null` keeps the task's default


# --- task YAML files given by path --------------------------------------------------------

LM_TASK = (TASKS / "wikitext2.yaml").read_text()
QA_TASK = "name: mine\ninclude: _qa.yaml\ndata: {folder: squad, file: dev.json, format: squad}\n"


@pytest.mark.parametrize("definition, message", [
    ("name: mine\ninclude: _wikitext.yaml\n", "mytask.yaml: the required key 'data' is missing"),
    (LM_TASK + "windoes: {context_len: 64}\n", "mytask.yaml: unknown key 'windoes' (did you mean 'windows'?)"),
    ("name: mine\ninclude: _qa.yaml\ndata: {folder: squad, format: squad}\n",
     "mytask.yaml: the required key 'data.file' is missing"),
    (QA_TASK + "max_new_tokens: lots\n", "mytask.yaml: 'max_new_tokens' must be an integer, not 'lots'"),
    ("name: mine\ninclude: _missing.yaml\n", "mytask.yaml: 'include' names _missing.yaml, but there is no file"),
    ("name: mine\ninclude: {_qa.yaml: 1}\n", "mytask.yaml: 'include' must name YAML files, not {'_qa.yaml': 1}"),
    ("name: mine\ninclude: mytask.yaml\n", "mytask.yaml: 'include' of mytask.yaml is circular"),
    ("name: mine\ndata: {}\n", "mytask.yaml: the required key 'family' is missing"),
    ("name: mine\nfamily: [qa]\n", "mytask.yaml: 'family' must be a string, not ['qa']"),
    # regression: a negative first ran the whole file but its last 299 questions
    (QA_TASK + "sample: {first: -299}\n", "mytask.yaml: 'sample.first' must be at least 1, not -299"),
    # regression: no words per passage was a traceback when the datastore was cut
    (LM_TASK + "passages: {words: 0, min_words: 10}\n", "mytask.yaml: 'passages.words' must be at least 1, not 0"),
])
def test_a_bad_task_file_is_one_line_naming_the_file_and_key(workdir, definition, message):
    Path("mytask.yaml").write_text(definition)
    assert message in error_line(run_cli("--task", "mytask.yaml", "--method", "none"))


def test_included_keys_are_defaults_that_the_including_file_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("family: qa\nprompt: chat\nmax_new_tokens: 32\nretriever: bm25\n")
    (tmp_path / "shared.yaml").write_text("include: base.yaml\nmax_new_tokens: 16\nretriever: dense\n")
    (tmp_path / "other.yaml").write_text("include: base.yaml\nprompt: completion\n")
    (tmp_path / "task.yaml").write_text("name: mine\ninclude: [shared.yaml, other.yaml]\n"
                                        "max_new_tokens: 4\n")
    assert read_task_definition(tmp_path / "task.yaml") == {
        "name": "mine", "family": "qa", "prompt": "completion", "max_new_tokens": 4,
        # other.yaml re-includes base.yaml, whose retriever overrides shared.yaml's
        "retriever": "bm25", "source": str(tmp_path / "task.yaml")}


def test_a_task_file_resolves_with_its_included_defaults(host, workdir):
    Path("mytask.yaml").write_text(QA_TASK.replace("dev.json", "dev-v1.1.rebuilt-from-explorer-html.json")
                                   + "max_new_tokens: 4\n")  # resolving reads the data file
    config = resolve(request(task="mytask.yaml"), host).task.config
    assert config["max_new_tokens"] == 4  # its own
    assert config["prompt"] == "completion" and len(config["few_shot"]) == 3  # from _qa.yaml


def test_a_task_file_elsewhere_includes_the_built_in_qa_defaults(tmp_path):
    """Regression: `include: _qa.yaml` worked only beside a copy of raghub's `_qa.yaml`, so a
    plugin's YAML could not use the built-in defaults."""
    (tmp_path / "mine.yaml").write_text(QA_TASK)
    definition = read_task_definition(tmp_path / "mine.yaml")
    assert definition == {**read_task_definition(TASKS / "_qa.yaml"), "name": "mine",
                          "data": {"folder": "squad", "file": "dev.json", "format": "squad"},
                          "source": str(tmp_path / "mine.yaml")}


SQUAD_ROW = {"id": "q1", "title": "Ulm", "context": "Albert Einstein was born in Ulm.",
             "question": "Where was Einstein born?", "answers": {"text": ["Ulm"]}}


@pytest.mark.parametrize("data_dir", ["elsewhere", None], ids=["a data directory", "the hub"])
@pytest.mark.parametrize("where", ["absolute", "beside the YAML"])
def test_a_task_reads_a_data_file_at_the_path_it_gives(host, workdir, monkeypatch, data_dir, where):
    monkeypatch.setattr("raghub.interfaces.default_data_dir", lambda: None)
    Path("elsewhere").mkdir()
    Path("tasks").mkdir()
    Path("tasks/qa.jsonl").write_text(json.dumps(SQUAD_ROW) + "\n")
    file = workdir / "tasks/qa.jsonl" if where == "absolute" else "qa.jsonl"
    Path("tasks/mytask.yaml").write_text(f"name: mine\ninclude: _qa.yaml\ndata: {{file: {file}, format: squad}}\n")
    task = resolve(RunRequest(task="tasks/mytask.yaml", method="none", data_dir=data_dir), host).task
    assert [q.question for q in task.loaded.questions] == ["Where was Einstein born?"]


@pytest.mark.parametrize("data, message", [
    ("{package: raghub, file: ../../../../etc/passwd, format: squad}",
     "mytask.yaml: the data path ../../../../etc/passwd leads outside the package raghub"),
    ("{package: raghub_no_such_plugin, file: qa.jsonl, format: squad}",
     "mytask.yaml: data.package names raghub_no_such_plugin, which is not an installed Python package"),
    ("{package: raghub, folder: squad, file: qa.jsonl, format: squad}",
     "mytask.yaml: data names both a package and a folder; give one"),
])
def test_a_task_data_file_outside_its_package_or_without_a_place_is_refused(workdir, data, message):
    Path("mytask.yaml").write_text(f"name: mine\ninclude: _qa.yaml\ndata: {data}\n")
    assert message in error_line(run_cli("--task", "mytask.yaml", "--method", "none"))


# --- cross-option checks, ignored options, results folder ---------------------------------

def test_a_stride_with_no_room_within_max_length_exits_2_before_the_model_loads(workdir):
    line = error_line(run_cli("--task", "wikitext2", "--method", "incontext", "--stride", "2000"))
    assert "--stride 2000 with --retrieved-max-length 256 leaves no context within max_length 1024" in line


@pytest.mark.parametrize("ignored, warning", [
    ({"n_docs": 3}, "--n-docs ignored: method 'none' retrieves nothing"),
    ({"retriever": "bm25"}, "--retriever ignored: method 'none' retrieves nothing"),
    ({"retriever": "bm25", "n_docs": "3"}, "--retriever and --n-docs ignored"),
    ({"reranker": "lm", "refiner": "truncate"}, "--reranker and --refiner ignored: method 'none' retrieves nothing"),
])
def test_retrieval_settings_given_to_a_closed_book_method_are_warned(host, workdir, capsys, ignored, warning):
    (resolved,) = resolve_sweep({"task": "wikitext2", "method": "none", **ignored}, host)
    assert resolved.retriever_class is None and resolved.n_docs == 0
    assert warning in capsys.readouterr().err


def test_a_closed_book_run_without_retrieval_settings_warns_nothing(host, workdir, capsys):
    resolve_sweep({"task": "wikitext2", "method": "none"}, host)
    assert capsys.readouterr().err == ""


def test_a_results_dir_that_is_a_file_exits_2_and_leaves_the_file_alone(workdir):
    Path("out").write_text("keep me")
    line = error_line(run_cli("--task", "wikitext2", "--method", "none", "--results-dir", "out"))
    assert "--results-dir out is a file, not a folder" in line
    assert Path("out").read_text() == "keep me"


# --- --model-args and --model-backend -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--model-args", "nosuch=1"], "--model-args: model backend 'gguf' has no option nosuch "
                                   "(it takes: revision, trust_remote_code, attn_implementation, token_budget)"),
    (["--model-args", "broken"], "--model-args takes key=value pairs separated by commas, not 'broken'"),
    (["--model-args", "trust_remote_code=maybe"], "--model-args trust_remote_code must be true or false"),
    (["--model-backend", "nosuch"], "unknown model backend 'nosuch'; see `raghub models` "
                                    "(known: gguf, hf-causal, hf-seq2seq, openai)"),
])
def test_bad_model_settings_exit_2_before_the_model_loads(workdir, args, message):
    assert message in error_line(run_cli("--task", "wikitext2", "--method", "none", *args))


def test_model_args_are_converted_by_the_backends_declarations(host, workdir):
    backend = resolve(request(model_args="trust_remote_code=yes, revision=main"), host).backend
    assert backend.name == "gguf"
    assert backend.settings == {"revision": "main", "trust_remote_code": True, "attn_implementation": None,
                                "token_budget": None}


# --- two plugins declaring one option name ------------------------------------------------

class StrideAsText(Method):
    """A closed-book method whose `stride` is not the language-modelling task's."""

    name = "stride-as-text"
    needs_retrieval = False
    families = frozenset({"language-modelling"})
    options = {"stride": Option(str, "wide", "a different setting of the same name")}


class StrideToo(Method):
    """A closed-book method that reads the task's `stride` too."""

    name = "stride-too"
    needs_retrieval = False
    families = frozenset({"language-modelling"})
    options = {"stride": Option(int, 0, "the task's setting", at_least=0)}


class StridePlugin:
    @hookimpl
    def register_methods(self, register):
        register(StrideAsText)
        register(StrideToo)


@pytest.fixture
def stride_methods(add_plugin):
    add_plugin(StridePlugin())


def test_an_option_two_selected_plugins_mean_differently_is_refused(host, workdir, stride_methods):
    with pytest.raises(UsageError, match="--stride means different things to the task 'language-modelling' "
                                         "and the method 'stride-as-text'"):
        resolve(request(method="stride-as-text", stride="4"), host)


def test_an_option_two_selected_plugins_mean_alike_reaches_both(host, workdir, stride_methods):
    options = resolve(request(method="stride-too", stride="4"), host).plugin_options
    assert options["task"] == {"stride": 4} and options["method"] == {"stride": 4}


# --- errors through the CLI group -----------------------------------------------------------

@pytest.mark.parametrize("error, exit_code", [(RunError, 1), (UsageError, 2)])
def test_raghub_errors_inside_a_command_are_one_line_with_their_exit_code(error, exit_code):
    @cli.command("fail-for-test")
    def fail_for_test():
        raise error("the cloud process stopped")

    try:
        result = CliRunner().invoke(cli, ["fail-for-test"])
    finally:
        del cli.commands["fail-for-test"]
    assert result.exit_code == exit_code
    assert result.output == "Error: the cloud process stopped\n"


# --- Option.convert, check_schema, parse_key_values ---------------------------------------

@pytest.mark.parametrize("option, value, expected", [
    (Option(int, None, ""), "3", 3),
    (Option(int, None, ""), 3.0, 3),
    (Option(int, None, "", at_least=1), 1, 1),
    (Option(float, None, "", at_most=1), "1e-3", 0.001),
    (Option(bool, False, ""), "yes", True),
    (Option(bool, True, ""), "0", False),
    (Option(("a", "b"), "a", ""), "b", "b"),
    (Option(int, None, ""), None, None),
])
def test_option_convert_accepts(option, value, expected):
    assert option.convert("some_value", value) == expected


@pytest.mark.parametrize("option, value, message", [
    (Option(int, None, ""), 2.5, "--some-value must be an int, not 2.5"),
    (Option(int, None, ""), True, "--some-value must be an int, not True"),
    (Option(int, None, ""), float("inf"), "--some-value must be an int, not inf"),
    (Option(float, None, "", above=0), "nan", "--some-value must be a finite float, not 'nan'"),
    # regression: infinity passed every bound (--learning-rate inf trained to NaN weights)
    (Option(float, None, "", above=0), float("inf"), "--some-value must be a finite float, not inf"),
    (Option(float, None, ""), "-inf", "--some-value must be a finite float, not '-inf'"),
    (Option(float, None, ""), [1.0], "--some-value must be a finite float, not [1.0]"),
    (Option(str, "", ""), 5, "--some-value must be a string, not 5"),
    (Option(bool, False, ""), "maybe", "--some-value must be true or false, not 'maybe'"),
    (Option(("a", "b"), "a", ""), "c", "--some-value must be one of a, b, not 'c'"),
    (Option(int, None, "", at_least=1), 0, "--some-value must be at least 1, not 0"),
    (Option(float, None, "", at_most=1), 1.5, "--some-value must be at most 1, not 1.5"),
    (Option(float, None, "", above=0), "0", "--some-value must be above 0, not 0.0"),
])
def test_option_convert_refuses_with_a_line_naming_the_flag(option, value, message):
    with pytest.raises(UsageError) as refused:
        option.convert("some_value", value)
    assert str(refused.value) == message


def test_option_convert_names_the_flag_it_is_given():
    with pytest.raises(UsageError, match="^--model-args k must be an int, not 'x'$"):
        Option(int, None, "").convert("k", "x", "--model-args k")


SCHEMA = {"name": Field(str, required=True), "rate": Field(float), "count": Field(int),
          "at_least_two": Field(int, at_least=2),
          "data": Field({"file": Field(str, required=True), "format": Field(("squad", "ircot"))})}


def test_check_schema_accepts_a_fitting_mapping():
    fitting = {"name": "t", "rate": 1, "count": 2, "data": {"file": "f", "format": "squad"}}
    check_schema(fitting, SCHEMA, "t.yaml")  # an int is a fine float


@pytest.mark.parametrize("mapping, message", [
    ({"name": "t", "data": {"fiel": "f"}}, "t.yaml: unknown key 'data.fiel' (did you mean 'data.file'?)"),
    ({"name": "t", "data": {}}, "t.yaml: the required key 'data.file' is missing"),
    ({"name": "t", "data": {"file": 3}}, "t.yaml: 'data.file' must be a string, not 3"),
    ({"name": "t", "data": {"file": "f", "format": "hotpot"}}, "t.yaml: 'data.format' must be one of squad, ircot"),
    ({"name": "t", "data": "f"}, "t.yaml: 'data' must be a mapping, not 'f'"),
    ({"name": "t", "count": True}, "t.yaml: 'count' must be an integer, not True"),
    ({"name": "t", "data": {"file": "f"}, "at_least_two": 1}, "t.yaml: 'at_least_two' must be at least 2, not 1"),
    ({"name": "t", "data": {"file": "f"}, "rate": float("nan")}, "t.yaml: 'rate' must be a finite float, not nan"),
    ({"data": {"file": "f"}}, "t.yaml: the required key 'name' is missing"),
    ({"name": "t", "nmae": "t"}, "t.yaml: unknown key 'nmae' (did you mean 'name'?)"),
])
def test_check_schema_names_the_file_and_the_dotted_key(mapping, message):
    with pytest.raises(UsageError) as refused:
        check_schema(mapping, SCHEMA, "t.yaml")
    assert str(refused.value).startswith(message)


def test_parse_key_values_splits_pairs_on_commas_and_the_first_equals():
    assert parse_key_values(" a=1, b = two ,, c=x=y", "--m") == {"a": "1", "b": "two", "c": "x=y"}
    assert parse_key_values("", "--m") == {}


@pytest.mark.parametrize("text", ["broken", "=1", "a=1,b"])
def test_parse_key_values_refuses_a_pair_without_key_or_equals(text):
    with pytest.raises(UsageError, match="^--m takes key=value pairs separated by commas"):
        parse_key_values(text, "--m")


# --- corpus files -----------------------------------------------------------------------------

def corpus_file(tmp_path, name, content) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def passages(path):
    return [(p.id, p.title, p.text) for p in read_corpus(path)]


def test_a_jsonl_corpus_gives_ids_and_titles_where_they_are_missing(tmp_path):
    rows = [{"id": 7, "title": "Seven", "text": "one"}, {"text": "two\u2028lines"}]
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]  # U+2028 stays raw
    path = corpus_file(tmp_path, "c.jsonl", "\n".join(lines) + "\n\n")
    assert passages(path) == [("7", "Seven", "one"), ("1", "", "two\u2028lines")]


def test_a_tsv_corpus_reads_its_columns_by_the_header(tmp_path):
    path = corpus_file(tmp_path, "c.tsv",
                       "text\tid\ttitle\none\u2028more\tp1\tOne\n\"two, \"\"quoted\"\"\"\t\t\n")
    assert passages(path) == [("p1", "One", "one\u2028more"), ("1", "", 'two, "quoted"')]


def test_a_tsv_corpus_reads_a_field_longer_than_csvs_default_limit(tmp_path):
    """Regression: a passage over 128 KiB was a `_csv.Error` traceback."""
    long = "word " * 40_000
    path = corpus_file(tmp_path, "c.tsv", f"id\ttext\n1\t{long}\n2\tshort\n")
    assert [text for _, _, text in passages(path)] == [long, "short"]


def test_a_text_corpus_has_one_passage_per_block_between_blank_lines(tmp_path):
    path = corpus_file(tmp_path, "c.txt", "  first line\nsecond\n\n\n  next\n \t\nlast\r\n")
    assert passages(path) == [("0", "", "  first line\nsecond"), ("1", "", "  next"), ("2", "", "last")]


@pytest.mark.parametrize("name, content, message", [
    ("c.jsonl", '{"text": "a"}\n{"text": \n', "c.jsonl, line 2: not JSON"),
    ("c.jsonl", '["a"]\n', "c.jsonl, line 1: not an object"),
    ("c.jsonl", '{"title": "a"}\n', "passage 1 has no text"),
    ("c.tsv", "id\tbody\n1\ta\n", "passage 1 has no text"),
    ("c.txt", b"caf\xe9\n", "is not UTF-8 text"),
    ("c.txt", " \n\n", "holds no passages"),
    ("c.jsonl", "", "holds no passages"),
])
def test_a_bad_corpus_file_is_a_usage_error_naming_it(tmp_path, name, content, message):
    with pytest.raises(UsageError, match=message):
        read_corpus(corpus_file(tmp_path, name, content))


def test_a_missing_corpus_file_is_a_usage_error_naming_the_formats(tmp_path):
    with pytest.raises(UsageError, match=r"corpus file not found: .*nothing\.tsv \(give a \.jsonl"):
        read_corpus(tmp_path / "nothing.tsv")


def test_an_options_check_refuses_a_value_with_its_reason():
    """`Option(check=...)` runs after conversion, on non-empty values, with the flag in front."""
    even = Option(int, 0, "an even number", check=lambda n: None if n % 2 == 0 else f"must be even, not {n}")
    assert even.convert("pairs", "4") == 4
    with pytest.raises(UsageError, match=r"^--pairs must be even, not 3$"):
        even.convert("pairs", "3")
    assert Option(str, "", "x", check=lambda v: "never").convert("name", "") == ""
