"""Bad input that used to end in a traceback or a hang: each is one line and exit code 2 with
nothing written, and fails before the model loads where it can be judged before it."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bad_input import assert_one_line_exit_2, model_never_loads  # noqa: F401
from raghub import Example, Passage, Retriever, Task
from raghub.cache import Cache
from raghub.cli import cli
from raghub.retrieval import retrieve

TASKS = Path(__file__).resolve().parents[1] / "tasks"
QA_TASK = "name: mine\ninclude: _qa.yaml\ndata: {{folder: {folder}, file: {file}, format: {format}}}\n"
LM_TASK = ("name: mine\ninclude: _wikitext.yaml\n"
           "data: {{hub: none, config: none, folder: {folder}, files: {{test: [{file}]}}}}\n")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory holding the shipped `_qa.yaml` and `_wikitext.yaml`, with an
    empty cache of its own; runs store into `results/` there."""
    for name in ("_qa.yaml", "_wikitext.yaml"):
        shutil.copy(TASKS / name, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def run(*args, results_dir="results"):
    return CliRunner().invoke(cli, ["run", *args, "--results-dir", results_dir])


# --- 1. task data paths stay inside the data directory -----------------------------------

@pytest.mark.parametrize("template", [QA_TASK, LM_TASK], ids=["qa", "language-modelling"])
@pytest.mark.parametrize("folder, file", [("../../etc", "passwd"), ("/etc", "passwd"),
                                          ("squad", "/etc/passwd")])
def test_a_task_data_path_outside_the_data_dir_is_refused_before_the_model_loads(
        workdir, model_never_loads, template, folder, file):
    Path("mytask.yaml").write_text(template.format(folder=folder, file=file, format="squad"))
    result = run("--task", "mytask.yaml", "--method", "none")
    assert_one_line_exit_2(result, "mytask.yaml: the data path", workdir / "results")
    assert "leads outside the data directory" in result.output


# --- 2. truncated, non-UTF-8, empty or misshapen dataset files ---------------------------

def qa(format, file, content, message, id):
    return pytest.param(QA_TASK, format, file, content, message, id=f"qa-{id}")


def lm(file, content, message, id):
    return pytest.param(LM_TASK, "", file, content, message, id=f"lm-{id}")


@pytest.mark.parametrize("template, format, file, content, message", [
    qa("squad", "dev.json", '{"data": [{"title": "T", "para', "dev.json, line 1: not JSON", "truncated-json"),
    qa("flashrag", "dev.jsonl", '{"id": 1, "question": "q", "golden_answers": ["a"]}\n{"id": 2, "qu',
       "dev.jsonl, line 2: not JSON", "truncated-jsonl"),
    qa("squad", "dev.json", b'{"data": "caf\xe9"}', "dev.json is not UTF-8 text", "latin-1-json"),
    qa("popqa", "dev.tsv", b"id\tquestion\n1\tcaf\xe9\n", "dev.tsv is not UTF-8 text", "latin-1-tsv"),
    qa("squad", "dev.json", b"", "dev.json is empty", "empty-json"),
    qa("flashrag", "dev.jsonl", b"\n", "dev.jsonl is empty", "blank-jsonl"),
    qa("squad", "dev.json", '{"version": "1.1"}', "dev.json has no 'data'", "squad-without-data"),
    qa("squad", "dev.json", "[1, 2]", "dev.json is not squad data", "numbers-as-squad"),
    qa("flashrag", "dev.jsonl", '{"id": 1, "question": "q"}\n',
       "dev.jsonl is not flashrag data: row 1 has no 'golden_answers'", "row-without-answers"),
    qa("flashrag", "dev.jsonl", '{"id": 1, "question": "q", "golden_answers": []}\n',
       "dev.jsonl, row 1: 'golden_answers' holds no answer", "empty-answer-list"),
    qa("squad", "dev.jsonl", "".join(json.dumps({"id": "x", "title": "T", "context": "c", "question": "q",
                                                 "answers": {"text": ["a"]}}) + "\n" for _ in range(2)),
       "dev.jsonl: rows 1 and 2 have the same id 'x'", "duplicate-ids"),
    lm("test.jsonl", '{"text": " a \\n"}\n{"te', "test.jsonl, line 2: not JSON", "truncated-jsonl"),
    lm("test.jsonl", b'{"text": "caf\xe9"}\n', "test.jsonl is not UTF-8 text", "latin-1-jsonl"),
    lm("test.raw", b"caf\xe9\n", "test.raw is not UTF-8 text", "latin-1-raw"),
    lm("test.raw", b"", "test.raw is empty", "empty-raw"),
    lm("test.jsonl", b"", "test.jsonl is empty", "empty-jsonl"),
    lm("test.jsonl", '{"text": " a \\n"}\n{"title": "b"}\n', "test.jsonl, line 2: no 'text' string",
       "row-without-text"),
    lm("test.jsonl", '{"text": ""}\n{"text": " \\n"}\n', "test.jsonl holds no text: every row is empty",
       "only-empty-rows"),
])
def test_a_broken_data_file_is_one_line_naming_it_before_the_model_loads(workdir, model_never_loads, template,
                                                                        format, file, content, message):
    folder = workdir / "data" / "set"
    folder.mkdir(parents=True)
    (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    Path("mytask.yaml").write_text(template.format(folder="set", file=file, format=format))
    result = run("--task", "mytask.yaml", "--method", "none", "--data-dir", "data")
    assert_one_line_exit_2(result, message, workdir / "results")


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "nonexistent"], "--data-dir nonexistent is not a folder"),
    (["--model", "/nonexistent/folder"], "model folder /nonexistent/folder does not exist (and it is not a hub id)"),
    (["--model", "./missing-folder"], "model folder ./missing-folder does not exist (and it is not a hub id)"),
    (["--model", "missing.gguf"], "model file not found: missing.gguf"),
    (["--model-backend", "hf-causal"], "model backend 'hf-causal' needs --model"),
])
def test_a_missing_data_dir_or_model_is_refused_before_the_model_loads(workdir, model_never_loads, args, message):
    result = run("--task", "squad", "--method", "none", "--limit", "1", *args)
    assert_one_line_exit_2(result, message, workdir / "results")


# --- 3. a corrupt .gguf model file ---------------------------------------------------------

@pytest.mark.parametrize("corruption", ["random bytes", "truncated copy"])
def test_a_corrupt_gguf_file_is_one_line_naming_it(workdir, corruption):
    from raghub.plugins.models.huggingface import embedded_gguf

    if corruption == "random bytes":
        content = os.urandom(4096)
    else:  # the embedded model's first MiB: its header, cut inside the tokenizer's metadata
        with open(embedded_gguf(), "rb") as whole:
            content = whole.read(1 << 20)
    Path("broken.gguf").write_bytes(content)
    result = run("--task", "wikitext2", "--method", "none", "--limit", "1", "--model", "broken.gguf")
    assert_one_line_exit_2(result, "broken.gguf is not a readable GGUF file", workdir / "results")


# --- 4. a device this machine does not have --------------------------------------------------

@pytest.mark.parametrize("device, message", [
    ("bogus", "--device bogus is not a torch device"),
    ("cuda", "--device cuda: this machine has no CUDA device"),
    ("cuda:3", "--device cuda:3: this machine has no CUDA device"),
])
def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(workdir, model_never_loads,
                                                                      monkeypatch, device, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = run("--task", "wikitext2", "--method", "none", "--device", device)
    assert_one_line_exit_2(result, message, workdir / "results")


def test_a_cuda_index_beyond_the_devices_is_refused_before_the_model_loads(workdir, model_never_loads,
                                                                          monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    result = run("--task", "wikitext2", "--method", "none", "--device", "cuda:2")
    assert_one_line_exit_2(result, "--device cuda:2: this machine has 2 CUDA devices (cuda:0 to cuda:1)",
                           workdir / "results")


# --- 5. a results directory that cannot be written --------------------------------------------

@pytest.fixture
def read_only_folder(workdir, monkeypatch):
    """A folder in which no file can be created. Tests run as root here, where chmod does not stop
    writes, so `os.open` refuses them as on a read-only mount."""
    folder = workdir / "read-only"
    folder.mkdir()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(path).absolute().is_relative_to(folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    return folder


@pytest.mark.parametrize("results_dir", ["read-only", "read-only/results"])
def test_a_results_dir_that_cannot_be_written_is_refused_before_the_model_loads(
        read_only_folder, model_never_loads, results_dir):
    result = run("--task", "wikitext2", "--method", "none", results_dir=results_dir)
    assert_one_line_exit_2(result, f"--results-dir {results_dir} cannot be written (Permission denied)",
                           read_only_folder / "results")
    assert not any(read_only_folder.iterdir())


def test_a_results_dir_inside_a_file_is_refused_before_the_model_loads(workdir, model_never_loads):
    Path("out").write_text("keep me")
    result = run("--task", "wikitext2", "--method", "none", results_dir="out/results")
    assert_one_line_exit_2(result, "--results-dir out/results is inside out, which is a file",
                           workdir / "results")
    assert Path("out").read_text() == "keep me"


# --- 6. the leaderboard's inputs and output -------------------------------------------------

RECORD = {"task": "t", "method": "m", "n_examples": 1, "metrics": {"em": 1.0},
          "higher_is_better": {"em": True}}


def test_the_leaderboard_skips_and_names_json_lines_that_are_not_records(tmp_path):
    not_records = ["[1, 2]", '{"x": 1}', json.dumps({k: v for k, v in RECORD.items() if k != "metrics"})]
    (tmp_path / "records.jsonl").write_text("\n".join([json.dumps(RECORD), *not_records]) + "\n")
    result = CliRunner().invoke(cli, ["leaderboard", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| m |" in result.stdout
    for line in (2, 3, 4):
        assert f"records.jsonl, line {line}: skipped, not a record" in result.stderr


@pytest.mark.parametrize("command", [["leaderboard"], ["plot"], ["samples", "latest"],
                                     ["compare", "latest", "latest"]])
def test_a_results_dir_that_does_not_exist_is_one_line_exit_2(tmp_path, command):
    missing = tmp_path / "nonexistent"
    result = CliRunner().invoke(cli, [*command, "--results-dir", str(missing)])
    assert_one_line_exit_2(result, f"--results-dir {missing} is not a folder of results", missing)


def test_a_leaderboard_output_in_a_missing_folder_is_one_line_exit_2(tmp_path):
    (tmp_path / "records.jsonl").write_text(json.dumps(RECORD) + "\n")
    output = tmp_path / "missing" / "dir" / "table.md"
    result = CliRunner().invoke(cli, ["leaderboard", "--results-dir", str(tmp_path), "--output", str(output)])
    assert_one_line_exit_2(result, f"--output {output} cannot be written (No such file or directory)",
                           tmp_path / "missing")


def test_a_leaderboard_of_a_missing_results_folder_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["leaderboard", "--results-dir", str(tmp_path / "nonexistent")])
    assert_one_line_exit_2(result, f"--results-dir {tmp_path / 'nonexistent'} is not a folder",
                           tmp_path / "nonexistent")


# --- 7. --n-docs above the corpus size ------------------------------------------------------

class ThreePassages(Task):
    """A task whose corpus is three passages (all that `retrieve` asks of it)."""

    def corpus(self):
        return [Passage(id=letter, text=letter) for letter in "abc"], "three letters"

    def examples(self, model, limit):
        raise NotImplementedError

    def evaluate(self, method, examples, retrieved):
        raise NotImplementedError

    def aggregate(self, stats):
        raise NotImplementedError


class InOrder(Retriever):
    """Every passage, in corpus order; counts its searches."""

    name = "in-order"
    searches = 0

    def index(self, passages, corpus_fingerprint):
        self.size = len(passages)

    def search(self, queries, k):
        self.searches += 1
        return [[(position, 1.0) for position in range(min(k, self.size))] for _ in queries]


def test_n_docs_above_the_corpus_size_is_clamped_to_it_with_a_notice(tmp_path, capsys):
    task, retriever, cache = ThreePassages("three", {}, None), InOrder(None), Cache(tmp_path)
    examples = [Example(id="1", query="a"), Example(id="2", query="b")]
    retrieved, _, _ = retrieve(task, retriever, examples, 1_000_000, cache)
    assert [len(hits) for hits in retrieved] == [3, 3]
    assert capsys.readouterr().err == ("raghub: --n-docs 1000000 is more than the corpus's 3 passages; "
                                       "retrieving 3\n")
    retrieve(task, retriever, examples, 3, cache)
    assert retriever.searches == 1  # the clamped k: the same retrieval as k = 3, from the cache
