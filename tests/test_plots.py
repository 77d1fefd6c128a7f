"""`raghub plot`: figures from hand-made records, no model."""

import pytest
from click.testing import CliRunner

from raghub.cli import cli
from raghub.record import Record
from raghub.records import append_record


def record(task, method, n_docs, value, stderr=None, metric="bits_per_byte", higher=False, n_examples=8):
    return Record.from_dict({"task": task, "method": method, "retriever": "bm25" if n_docs else None,
                             "model": "m", "n_docs": n_docs, "settings": "", "corpus": None, "n_examples": n_examples,
                             "metrics": {metric: value}, "higher_is_better": {metric: higher},
                             "stderr": {metric: stderr}})


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    for n_docs, value in ((2, 1.07), (4, 1.06), (10, 1.05)):
        append_record(folder, record("wikitext2", "ensemble", n_docs, value, 0.01))
    append_record(folder, record("wikitext2", "none", 0, 1.08, 0.01))
    for task, f1 in (("squad", 0.2), ("hotpotqa", 0.3)):
        for method, gain in (("none", 0.0), ("incontext", 0.1)):
            append_record(folder, record(task, method, 3 if gain else 0, f1 + gain, 0.02, "f1", True))
    return folder


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("name, magic", [("curve.png", b"\x89PNG"), ("curve.svg", b"<?xml")])
def test_a_metric_against_n_docs_is_drawn_as_png_or_svg(results, name, magic):
    output = results.parent / name
    result = invoke("plot", "--results-dir", str(results), "--task", "wikitext2", "--output", str(output))
    assert result.exit_code == 0, result.output
    assert output.read_bytes().startswith(magic)
    if name.endswith(".svg"):
        svg = output.read_text()
        assert "ensemble · bm25" in svg and "passages retrieved (n_docs)" in svg


def test_a_method_by_dataset_bar_chart_of_a_qa_metric(results):
    result = invoke("plot", "--kind", "bars", "--results-dir", str(results), "--task", "squad",
                    "--task", "hotpotqa", "--metric", "f1", "--output", str(results.parent / "bars.svg"))
    assert result.exit_code == 0, result.output
    svg = (results.parent / "bars.svg").read_text()
    assert "hotpotqa" in svg and "incontext · bm25 k=3" in svg


@pytest.mark.parametrize("args, message", [
    ([], "several tasks are stored (hotpotqa, squad, wikitext2); choose one with --task"),
    (["--task", "wikitext2", "--metric", "em"], "no stored record has the metric 'em'"),
    (["--task", "wikitext2", "--output", "plot.pdf"], "--output must end in .png or .svg"),
    (["--task", "popqa"], "no stored records of popqa"),
])
def test_bad_plot_requests_are_one_line_and_write_nothing(results, args, message):
    result = invoke("plot", "--results-dir", str(results), *args)
    assert result.exit_code == 2 and message in result.output
    assert sorted(p.name for p in results.iterdir()) == ["records.jsonl"]


def test_the_records_of_smaller_samples_left_out_are_named(results):
    """Regression: a record run with --limit vanished from the plot without a word."""
    append_record(results, record("wikitext2", "incontext", 4, 1.02, n_examples=3))
    result = CliRunner().invoke(cli, ["plot", "--results-dir", str(results), "--task", "wikitext2"])
    assert result.exit_code == 0, result.output
    assert ("plot leaves out 1 record run on fewer examples than their task's largest sample: "
            "wikitext2 incontext n_docs 4") in result.stderr and "(3 examples, not 8)" in result.stderr
    quiet = CliRunner().invoke(cli, ["plot", "--results-dir", str(results), "--task", "squad", "--kind", "bars"])
    assert quiet.exit_code == 0 and "leaves out" not in quiet.stderr
