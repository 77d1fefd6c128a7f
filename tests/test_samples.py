"""Per-sample logs, `raghub samples` and `raghub compare`: runs of a stub model and method on
the real HotpotQA task, hand-made records, and a real run killed with SIGKILL."""

import errno
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from raghub import Answer, Method, ModelBackend, RunError, hookimpl
from raghub.cli import cli
from raghub.plugins.tasks.question_answering.task import aggregate_stats

RAGHUB = Path(sys.executable).with_name("raghub")


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


# --- a stub model and method, so that runs take no model ------------------------------------

class StubModel:
    name = "stub-model"
    fingerprint = "stub-weights"
    dtype = "none"

    def chat_prompt(self, message):
        return message

    def hardware(self):
        return {"device": "none", "dtype": "none"}


class StubBackend(ModelBackend):
    name = "stub"

    @classmethod
    def handles(cls, spec):
        return spec == "stub"

    def load(self, spec, device, dtype, batch_size):
        return StubModel()


class GoldIfRetrieved(Method):
    """Answers right, with a generation, when its top passage is gold; else a plain string.
    After `budget` questions it fails once, the way a lost peer fails a run."""

    name = "gold-if-retrieved"
    budget = math.inf

    def answer(self, questions, retrieved):
        answers = []
        for question, docs in zip(questions, retrieved):
            if GoldIfRetrieved.budget == 0:
                GoldIfRetrieved.budget = math.inf
                raise RunError("stopped on purpose")
            GoldIfRetrieved.budget -= 1
            self.counters["questions_answered"] += 1
            top = docs[0].passage
            answers.append(Answer(question.answers[0], f"The answer is {question.answers[0]}.\nMore")
                           if question.is_gold(top.id, top.title) else "no idea")
        return answers


class StubPlugin:
    @hookimpl
    def register_models(self, register):
        register(StubBackend)

    @hookimpl
    def register_methods(self, register):
        register(GoldIfRetrieved)


@pytest.fixture
def stub_plugin(tmp_path, monkeypatch, add_plugin):
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    add_plugin(StubPlugin())
    yield
    GoldIfRetrieved.budget = math.inf


def run_stub(results, *extra):
    return invoke("run", "--task", "hotpotqa", "--method", "gold-if-retrieved", "--model", "stub",
                  "--n-docs", 2, "--limit", 4, "--batch-size", 1, "--json", "--results-dir", results, *extra)


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_run_logs_every_example_beside_its_record(stub_plugin, tmp_path):
    result = run_stub(tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["samples"] == f"samples/{record['id']}.jsonl" and record["schema_version"] == 2
    assert "source" not in record["config"]["task"]["config"]  # no path of this machine in the record
    lines = read_lines(tmp_path / record["samples"])
    assert len(lines) == len({line["id"] for line in lines}) == record["n_examples"] == 4
    assert list(lines[0]) == ["id", "question", "answers", "type", "prediction", "generation",
                              "em", "f1", "match", "recall@2", "retrieved"]
    assert {line["type"] for line in lines} == {"bridge", "comparison"}
    for line in lines:
        assert [p["rank"] for p in line["retrieved"]] == [1, 2]
        assert set(line["retrieved"][0]) == {"id", "title", "text_start", "score", "rank", "gold"}
        right = line["retrieved"][0]["gold"]
        assert line["em"] == float(right) and line["prediction"] == (line["answers"][0] if right else "no idea")
        assert line["generation"] == (f"The answer is {line['answers'][0]}.\nMore" if right else None)
        assert line["recall@2"] == sum(p["gold"] for p in line["retrieved"]) / 2
    assert 0 < record["metrics"]["em"] < 1  # both kinds of answer are logged
    assert record["metrics"] == aggregate_stats(lines)  # the samples re-aggregate to the record
    assert record["stderr"].keys() == record["higher_is_better"].keys() == {"em", "f1", "match", "recall@2"}
    assert record["stderr"]["em"] == pytest.approx(
        math.sqrt(sum((line["em"] - record["metrics"]["em"]) ** 2 for line in lines) / 3 / 4))
    assert record["totals"] == {}


def test_match_reaches_the_leaderboard_by_type_and_compare(stub_plugin, tmp_path):
    record = json.loads(run_stub(tmp_path).stdout)
    assert record["stderr"]["match"] is not None
    board = invoke("leaderboard", "--by-type", "--results-dir", tmp_path).stdout
    headline, bridge = board.split("### hotpotqa — bridge")[0], board.split("### hotpotqa — bridge")[1]
    assert "| match |" in headline and f"{record['metrics']['match']:.4f} ± {record['stderr']['match']:.4f}" in headline
    assert "| match |" in bridge.split("###")[0]
    compared = json.loads(invoke("compare", record["id"], record["id"], "--json", "--results-dir", tmp_path).stdout)
    assert compared["metrics"]["match"]["a"] == record["metrics"]["match"]


def test_an_interrupted_run_resumes_to_the_same_samples(stub_plugin, tmp_path):
    uninterrupted = json.loads(run_stub(tmp_path / "a").stdout)
    GoldIfRetrieved.budget = 2
    failed = run_stub(tmp_path / "b")
    assert failed.exit_code == 1 and "stopped on purpose" in failed.output
    [resume_file] = (tmp_path / "b" / ".partial").iterdir()
    assert len(read_lines(resume_file)) == 2
    resumed = json.loads(run_stub(tmp_path / "b").stdout)
    assert (read_lines(tmp_path / "b" / resumed["samples"])
            == read_lines(tmp_path / "a" / uninterrupted["samples"]))
    assert resumed["stderr"] == uninterrupted["stderr"]
    # regression: method_stats counted only the last process's work
    assert resumed["method_stats"] == uninterrupted["method_stats"] == {"questions_answered": 4}


def test_a_run_resumed_after_raghub_s_own_code_changed_computes_every_example_again(stub_plugin, tmp_path,
                                                                                     monkeypatch):
    """Regression: the resume file was named by the plugins' code but not raghub's own, so a run
    interrupted and started again after a change to the core (a metric, a prompt) stored the
    examples the old code computed beside the new code's, in one record."""
    GoldIfRetrieved.budget = 2
    assert run_stub(tmp_path).exit_code == 1
    monkeypatch.setattr("raghub.resolution.core_identity", lambda: {"source": "edited"})
    answered = []
    answer = GoldIfRetrieved.answer
    monkeypatch.setattr(GoldIfRetrieved, "answer", lambda self, questions, retrieved:
                        answered.extend(questions) or answer(self, questions, retrieved))
    resumed = run_stub(tmp_path)
    assert resumed.exit_code == 0 and len(answered) == json.loads(resumed.stdout)["n_examples"] == 4


def test_the_resume_file_keeps_verified_batches_only(tmp_path):
    from raghub.resume import _batch_line, _read_resume_file

    path = tmp_path / "resume.jsonl"
    line = {"id": "w1", "nll": 1.0, "tokens": 2, "bytes": 3, "retrieved": []}
    older = {"id": "w0", "nll": 1.0, "retrieved": [], "method_counters": {"calls": 1}}  # an older raghub's line
    path.write_text(json.dumps(older) + "\n" + _batch_line([line], {"calls": 2}) + _batch_line([line], {})[:30])
    assert _read_resume_file(path) == ({"w1": line}, {"calls": 2})


def damaged(line: bytes, damage: str) -> bytes:
    """A resume file's line with one kind of damage."""
    if damage == "a non-UTF-8 byte":
        return line.replace(b'"question": "', b'"question": "\xff', 1)
    if damage == "an edited number":
        return re.sub(rb'"em": ([01])\.0', lambda m: b'"em": %d.0' % (1 - int(m[1])), line, count=1)
    return line[: len(line) // 2]  # a torn line


@pytest.mark.parametrize("damage, where", [("a non-UTF-8 byte", 0), ("an edited number", 0), ("a torn line", -1)])
def test_a_damaged_batch_in_the_resume_file_is_dropped_with_a_notice_and_computed_again(
        stub_plugin, tmp_path, damage, where):
    """Regression: a non-UTF-8 byte in the resume file crashed every rerun, and an edited number
    flowed into the record. Each batch carries a checksum; one that fails it, wherever it is,
    is dropped and its examples are computed again."""
    uninterrupted = json.loads(run_stub(tmp_path / "a").stdout)
    GoldIfRetrieved.budget = 3
    assert run_stub(tmp_path / "b").exit_code == 1
    [resume_file] = (tmp_path / "b" / ".partial").iterdir()
    lines = resume_file.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3  # three batches of one
    lines[where] = damaged(lines[where], damage)
    resume_file.write_bytes(b"".join(lines))
    result = run_stub(tmp_path / "b")
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout)
    assert (read_lines(tmp_path / "b" / resumed["samples"])
            == read_lines(tmp_path / "a" / uninterrupted["samples"]))
    for key in ("metrics", "stderr", "method_stats"):
        assert resumed[key] == uninterrupted[key]
    assert f"{resume_file}: 1 damaged batch dropped (line {len(lines) if where else 1})" in result.stderr


# --- hand-made records and samples --------------------------------------------------------

def store(results, record_id, task, family, higher, lines, suffix=".jsonl", **extra):
    """Write one record and its samples log (gzipped when `suffix` ends in .gz) into `results`."""
    (results / "samples").mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines).encode()
    samples = f"samples/{record_id}{suffix}"
    (results / samples).write_bytes(gzip.compress(text) if suffix.endswith(".gz") else text)
    record = {"id": record_id, "samples": samples, "task": task, "family": family,
              "method": "m", "retriever": None, "n_docs": 0,
              "n_examples": len(lines), "metrics": {}, "higher_is_better": higher, **extra}
    with open(results / "records.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def qa_line(example_id, em, kind, prediction):
    return {"id": example_id, "question": f"question {example_id}?", "answers": ["gold", "alias"],
            "type": kind, "prediction": prediction, "generation": None, "em": em, "f1": em,
            "retrieved": [{"id": "p1", "title": "Some [bold]title", "score": 9.5, "rank": 1, "gold": True}]}


QA_HIGHER = {"em": True, "f1": True}


@pytest.fixture(params=[".jsonl", ".jsonl.gz"])
def qa_store(tmp_path, request):
    """Two QA runs' records and samples logs, the logs plain or gzipped."""
    store(tmp_path, "20260101-000000-aaaaaa", "toyqa", "qa", QA_HIGHER,
          [qa_line("q1", 1.0, "bridge", "gold"), qa_line("q2", 0.0, "bridge", "wrong-one"),
           qa_line("q3", 1.0, "comparison", "gold"), qa_line("q4", 0.0, "comparison", "wrong-two")],
          suffix=request.param)
    store(tmp_path, "20260101-000001-bbbbbb", "toyqa", "qa", QA_HIGHER,
          [qa_line("q1", 0.0, "bridge", "x"), qa_line("q2", 0.0, "bridge", "y"),
           qa_line("q3", 1.0, "comparison", "gold"), qa_line("q9", 1.0, "comparison", "gold")],
          suffix=request.param)
    return tmp_path


def test_samples_shows_a_record_found_by_prefix_or_latest(qa_store):
    shown = invoke("samples", "20260101-000000", "--results-dir", qa_store)
    assert shown.exit_code == 0, shown.output
    assert "20260101-000000-aaaaaa" in shown.output and "4 of 4 examples" in shown.output
    assert "question q1?" in shown.output and "1. Some [bold]title (9.50) gold" in shown.output
    latest = invoke("samples", "latest", "--results-dir", qa_store)
    assert "20260101-000001-bbbbbb" in latest.output


def test_samples_of_language_modelling_shows_each_windows_text_and_its_passages_first_words(tmp_path):
    """Regression: a window showed only its id and numbers, and a passage only its id."""
    line = {"id": "test-769", "text": "The song was released in 1998 …", "nll": 2.0, "tokens": 1, "bytes": 1,
            "retrieved": [{"id": "train-12", "title": "", "text_start": "Robert Boulter is an English actor …",
                           "score": 3.5, "rank": 1}]}
    store(tmp_path, "lm-a", "toylm", "language-modelling", {"ppl": False}, [line])
    shown = CliRunner().invoke(cli, ["samples", "lm-a", "--results-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "text The song was released in 1998 …" in shown.output
    assert "1. train-12 (3.50)" in shown.output and "Robert Boulter is an English actor …" in shown.output


def test_samples_keeps_the_wrong_answers_of_a_type(qa_store):
    shown = invoke("samples", "20260101-000000", "--wrong", "--type", "comparison", "--results-dir", qa_store)
    assert "1 of 4 examples" in shown.output
    assert "wrong-two" in shown.output and "wrong-one" not in shown.output and "question q3?" not in shown.output


@pytest.mark.parametrize("reference, message", [
    ("20260101", "'20260101' is the start of 2 record ids (20260101-000000-aaaaaa, 20260101-000001-bbbbbb)"),
    ("nothing", "no record 'nothing'"),
])
def test_a_record_reference_that_is_not_one_record_is_one_line(qa_store, reference, message):
    shown = invoke("samples", reference, "--results-dir", qa_store)
    assert shown.exit_code == 2 and message in shown.output


def test_a_damaged_samples_log_is_one_line(qa_store):
    [log] = [path for path in (qa_store / "samples").iterdir() if path.name.startswith("20260101-000000")]
    log.write_bytes(log.read_bytes()[:-9])  # cut short: a torn JSON line, or a gzip stream without its end
    shown = invoke("samples", "20260101-000000", "--results-dir", qa_store)
    assert shown.exit_code == 2 and "is damaged" in shown.output and len(shown.output.splitlines()) == 1


def test_compare_pairs_shared_examples_by_hand(qa_store):
    out = invoke("compare", "20260101-000000", "20260101-000001", "--json", "--results-dir", qa_store)
    assert out.exit_code == 0, out.output
    comparison = json.loads(out.stdout)
    assert (comparison["n_shared"], comparison["n_a"], comparison["n_b"]) == (3, 4, 4)
    # shared q1..q3: A's EM 1, 0, 1 against B's 0, 0, 1: mean difference 1/3, se 1/3
    em = comparison["metrics"]["em"]
    assert em["a"] == pytest.approx(2 / 3) and em["b"] == pytest.approx(1 / 3)
    assert (em["difference"], em["se"]) == pytest.approx((1 / 3, 1 / 3))
    assert (em["wins"], em["losses"], em["ties"]) == (1, 0, 2)
    table = invoke("compare", "20260101-000000", "20260101-000001", "--results-dir", qa_store)
    assert "paired on the 3 examples both ran (A ran 4, B ran 4)" in table.output
    assert "0.3333" in table.output


def test_compare_language_modelling_by_bits_per_byte_by_hand(tmp_path):
    higher = {"nats_per_token": False, "ppl": False, "bits_per_byte": False}
    windows = lambda nlls: [{"id": f"w{i}", "nll": nll, "tokens": 1, "bytes": size, "retrieved": []}
                            for i, (nll, size) in enumerate(zip(nlls, [1, 2, 1]))]
    store(tmp_path, "lm-a", "toylm", "language-modelling", higher, windows([3.0, 1.0, 2.0]))
    store(tmp_path, "lm-b", "toylm", "language-modelling", higher, windows([1.0, 1.0, 0.0]))
    comparison = json.loads(invoke("compare", "lm-a", "lm-b", "--json", "--results-dir", tmp_path).stdout)
    bits = comparison["metrics"]["bits_per_byte"]
    # the paired case of test_stderr: d = (2, 0, 2) nats over bytes (1, 2, 1): 1 and 3/4, in bits
    assert (bits["difference"], bits["se"]) == pytest.approx((1 / math.log(2), 0.75 / math.log(2)))
    assert (bits["wins"], bits["losses"], bits["ties"]) == (0, 2, 1)  # lower is better: A loses
    assert set(comparison["metrics"]) == {"nats_per_token", "bits_per_byte"}


def run_config(dtype="float32", k1=1.5, sample=300):
    return {"model_dtype": dtype, "model_fingerprint": "w1", "retriever": {"name": "bm25", "k1": k1},
            "corpus": {"label": "squad", "fingerprint": "c1"}, "task": {"task": "toyqa", "config": {"sample": sample}}}


def compare_warning(tmp_path, config_a, config_b, **b_fields):
    lines = [qa_line("q1", 1.0, "bridge", "gold")]
    store(tmp_path, "run-a", "toyqa", "qa", QA_HIGHER, lines, method="incontext", retriever="bm25", config=config_a)
    store(tmp_path, "run-b", "toyqa", "qa", QA_HIGHER, lines, method="ensemble", retriever="bm25", config=config_b,
          **b_fields)
    out = CliRunner().invoke(cli, ["compare", "run-a", "run-b", "--results-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    return out.stderr


def test_compare_of_two_methods_run_alike_warns_of_nothing(tmp_path):
    assert compare_warning(tmp_path, run_config(), run_config()) == ""


def test_compare_names_what_else_the_two_runs_differ_in(tmp_path):
    """Regression: runs in float32 and bfloat16, with other retriever and task settings, were
    compared without a word."""
    said = compare_warning(tmp_path, run_config(), run_config(dtype="bfloat16", k1=0.9, sample=50), model="other")
    assert said.startswith("raghub: warning: A and B differ in more than the method: ")
    for difference in ("model (A: None, B: other)", "dtype (A: float32, B: bfloat16)",
                       "retriever.k1 (A: 1.5, B: 0.9)", "task.config.sample (A: 300, B: 50)"):
        assert difference in said


def test_compare_names_another_judge_of_two_judged_runs(tmp_path):
    """Regression: two runs judged by different judge models had their judged accuracies
    compared without a word, as if the methods alone differed."""
    def judged(fingerprint):
        return {**run_config(), "judge": {"name": "correctness", "model_fingerprint": fingerprint, "repeats": 1}}

    said = compare_warning(tmp_path, judged("j1"), judged("j2"))
    assert "judge.model_fingerprint (A: j1, B: j2)" in said
    assert compare_warning(tmp_path / "alike", judged("j1"), judged("j1")) == ""


def test_compare_refuses_runs_of_different_tasks(qa_store):
    store(qa_store, "other", "othertask", "qa", QA_HIGHER, [qa_line("q1", 1.0, "bridge", "gold")])
    out = invoke("compare", "20260101-000000", "other", "--results-dir", qa_store)
    assert out.exit_code == 2 and "runs of different tasks" in out.output


def helped_hurt_store(results):
    """Run A retrieves (gold passage or not per example), run B is closed-book; by hand:
    q1 fixed, q2 broke (both with gold retrieved), q3 and q5 right in both, q4 wrong in both."""
    def line(example_id, em, gold=None, f1=None):
        passages = [] if gold is None else [{"id": "p", "title": "T", "score": 1.0, "rank": 1, "gold": gold}]
        return {**qa_line(example_id, em, "bridge", f"answer {example_id}"), "retrieved": passages,
                "f1": em if f1 is None else f1}
    store(results, "run-a", "toyqa", "qa", QA_HIGHER,
          [line("q1", 1.0, True), line("q2", 0.0, True), line("q3", 1.0, False),
           line("q4", 0.0, False, f1=0.5), line("q5", 1.0, True)])
    store(results, "run-b", "toyqa", "qa", QA_HIGHER,
          [line("q1", 0.0), line("q2", 1.0), line("q3", 1.0), line("q4", 0.0), line("q5", 1.0)])
    return results


def test_compare_splits_right_and_wrong_by_gold_retrieved_by_hand(tmp_path):
    results = helped_hurt_store(tmp_path)
    comparison = json.loads(invoke("compare", "run-a", "run-b", "--json", "--results-dir", results).stdout)
    em = comparison["metrics"]["em"]["outcomes"]
    assert em["splits"] == {"gold": {"both right": 1, "fixed": 1, "broke": 1, "both wrong": 0},
                            "no gold": {"both right": 1, "fixed": 0, "broke": 0, "both wrong": 1}}
    assert (em["fixed"], em["broke"]) == (["q1"], ["q2"])
    assert "outcomes" not in comparison["metrics"]["f1"]  # q4's F1 of 0.5 is neither right nor wrong
    table = invoke("compare", "run-a", "run-b", "--results-dir", results).output
    assert "retrieval fixed (A right, B wrong): 1, q1" in table and "retrieval broke (A wrong, B right): 1, q2" in table
    assert "│ gold        │          1 │     1 │     1 │          0 │" in table
    assert "│ no gold     │          1 │     0 │     0 │          1 │" in table
    reverse = json.loads(invoke("compare", "run-b", "run-a", "--json", "--results-dir", results).stdout)
    assert reverse["metrics"]["em"]["outcomes"]["splits"] == {  # B retrieved nothing: gold unknown
        "unknown": {"both right": 2, "fixed": 1, "broke": 1, "both wrong": 1}}


def test_samples_changed_against_lists_what_retrieval_fixed_and_broke(tmp_path):
    results = helped_hurt_store(tmp_path)
    shown = invoke("samples", "run-a", "--changed-against", "run-b", "--results-dir", results)
    assert shown.exit_code == 0, shown.output
    assert "2 of 5 examples" in shown.output and "question q1?" in shown.output and "question q2?" in shown.output
    assert "changed retrieval fixed" in shown.output and "changed retrieval broke" in shown.output
    assert "B prediction answer q1" in shown.output
    assert "question q3?" not in shown.output
    graded = invoke("samples", "run-a", "--changed-against", "run-b", "--metric", "f1", "--results-dir", results)
    assert graded.exit_code == 2 and "--metric f1 does not score each example" in graded.output


# --- the store's files stay inside it ------------------------------------------------------

@pytest.mark.parametrize("samples", ["/etc/hostname", "../../../../etc/hostname", "samples/../../outside.jsonl"])
def test_a_samples_path_leading_out_of_the_store_is_refused(qa_store, samples):
    (qa_store.parent / "outside.jsonl").write_text(json.dumps(qa_line("q1", 1.0, "bridge", "secret")) + "\n")
    record = {**json.loads((qa_store / "records.jsonl").read_text().splitlines()[0]), "id": "evil", "samples": samples}
    with open(qa_store / "records.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    for command in (("samples", "evil"), ("compare", "evil", "20260101-000000")):
        shown = invoke(*command, "--results-dir", qa_store)
        assert shown.exit_code == 2 and "leads outside the results folder" in shown.output
        assert "secret" not in shown.output and len(shown.output.strip().splitlines()) == 1


def test_a_samples_log_linked_to_outside_the_store_is_refused(qa_store):
    [log] = [path for path in (qa_store / "samples").iterdir() if path.name.startswith("20260101-000000")]
    (qa_store.parent / "outside").write_bytes(log.read_bytes())
    log.unlink()
    log.symlink_to(qa_store.parent / "outside")
    shown = invoke("samples", "20260101-000000", "--results-dir", qa_store)
    assert shown.exit_code == 2 and "leads outside the results folder" in shown.output


def test_a_records_file_linked_to_outside_the_store_is_not_appended_to(stub_plugin, tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "records.jsonl").symlink_to(elsewhere)
    result = run_stub(tmp_path / "results")
    assert result.exit_code == 2 and "leads outside the results folder" in result.output
    assert elsewhere.read_text() == "" and not (tmp_path / "results" / "samples").exists()


@pytest.mark.parametrize("full_at", ["records.jsonl", "samples"])
def test_a_full_disk_when_a_run_is_stored_is_one_line_and_leaves_the_store_as_it_was(stub_plugin, tmp_path,
                                                                                   monkeypatch, full_at):
    results = tmp_path / "results"
    assert run_stub(results).exit_code == 0
    before = {path: path.read_bytes() for path in results.rglob("*") if path.is_file()}
    fsync = os.fsync

    def full_disk(descriptor):  # the disk fills when the record (or the samples log) is flushed
        if full_at in Path(os.readlink(f"/proc/self/fd/{descriptor}")).parts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(descriptor)

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", full_disk)
        result = run_stub(results, "--force")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines()[-1] == (  # after the progress bar: one line
        f"Error: the record could not be stored in {results} (No space left on device); "
        "the finished examples are kept: run the same command again to store it")
    after = {path: path.read_bytes() for path in results.rglob("*") if path.is_file() and ".partial" not in path.parts}
    assert after == before  # nothing torn, no samples log without its record
    stored = run_stub(results, "--force")  # resumed from the kept examples
    assert stored.exit_code == 0 and len((results / "records.jsonl").read_text().splitlines()) == 2


# --- a real run killed with SIGKILL -------------------------------------------------------

@pytest.mark.real_model
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_samples(tmp_path):
    command = [str(RAGHUB), "run", "--task", "wikitext2", "--method", "none", "--limit", "3",
               "--batch-size", "1", "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.Popen([*command, "--results-dir", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "killed" / ".partial"
    deadline = time.monotonic() + 300
    while not any(path.stat().st_size for path in partial.glob("*.jsonl")) and killed.poll() is None:
        assert time.monotonic() < deadline, "no example reached the resume file"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [resume_file] = partial.glob("*.jsonl")
    assert 1 <= resume_file.read_text().count("\n") < 3, "the kill did not come mid-run"
    resumed, whole = (json.loads(subprocess.run([*command, "--results-dir", str(tmp_path / folder)], env=env,
                                                capture_output=True, text=True, check=True).stdout)
                      for folder in ("killed", "whole"))
    lines = read_lines(tmp_path / "killed" / resumed["samples"])
    assert lines == read_lines(tmp_path / "whole" / whole["samples"])
    assert [set(line) for line in lines] == [{"id", "text", "nll", "tokens", "bytes", "retrieved"}] * 3
    assert resumed["totals"] == whole["totals"] and resumed["totals"]["tokens"] == sum(l["tokens"] for l in lines)
    assert resumed["stderr"]["bits_per_byte"] > 0
