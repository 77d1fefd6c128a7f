"""The benchmarks are run by hand, so nothing else notices when one stops importing: each
`benchmarks/*.py` must at least import (its `main` runs only as a script)."""

import json

import pytest
from benchmark_scripts import BENCHMARKS, benchmark


@pytest.mark.parametrize("path", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_a_benchmark_imports(path):
    """Regression: speed.py imported BF16_CPU_FLAGS from where it no longer lives."""
    benchmark(path.stem)


def test_the_random_shape_speed_benchmark_runs_and_raghub_agrees_with_the_plain_loop(capsys):
    """`speed.py --model-shape` (meant for a GPU) runs end to end on a tiny random OPT here,
    and its table's plain-loop rows give raghub's log-probs (bf16 or float32: within 1e-3)."""
    speed = benchmark("speed")
    speed.main(["--model-shape", "opt-tiny", "--device", "cpu", "--windows", "1", "--k", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| none", "| ensemble"))]
    assert [(row[0], row[1]) for row in rows] == [("| none", "raghub"), ("| none", "plain loop"),
                                                  ("| ensemble", "raghub"), ("| ensemble", "plain loop")]
    for row in rows:
        largest = float(row[-1].split("(")[1].rstrip(") |"))
        assert largest < 1e-3


@pytest.mark.real_model
def test_the_server_agreement_benchmark_runs_against_a_recorded_server(monkeypatch, capsys):
    """`server_agreement.py` end to end on one question, against a recorded server that answers
    every prompt ' Paris' (SQuAD's first question is about Super Bowl 50): the answers part at
    their first token, where in-process's own token is scored above the server's."""
    from raghub.plugins.models.openai import OpenAICompatible
    from recorded_server import RecordedServer

    monkeypatch.setattr(OpenAICompatible, "transport", RecordedServer("vllm").transport)
    benchmark("server_agreement").main(["--server", "http://models.example:8000/v1", "--questions", "1",
                                        "--dtype", "float32"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"method"')]
    assert [row["method"] for row in rows] == ["incontext", "none"]
    for row in rows:
        assert (row["questions"], row["same_answers"], row["same_tokens"], row["parted_where_one_stops"]) == (1, 0, 0, 0)
        [margin] = row["parting_margins_nats"]
        assert margin > 0


def test_the_float32_gguf_holds_what_the_quantised_blocks_stand_for_and_the_same_metadata(tmp_path):
    """`float32_gguf.py` on a small GGUF with Q4_1, Q8_0 and F32 tensors: every tensor comes back
    float32 and equal to gguf's own dequantisation, and every key but the file type is kept."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    weights = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    quantised = {"a.weight": gguf.GGMLQuantizationType.Q4_1, "b.weight": gguf.GGMLQuantizationType.Q8_0,
                 "c.weight": gguf.GGMLQuantizationType.F32}
    writer = gguf.GGUFWriter(tmp_path / "small.gguf", "llama")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_context_length(128)
    writer.add_token_list(["<s>", "a", "b"])
    for name, kind in quantised.items():
        writer.add_tensor(name, quantize(weights, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    stored = benchmark("float32_gguf").write_float32_gguf(tmp_path / "small.gguf", tmp_path / "f32.gguf")

    assert stored == {"Q4_1": 1, "Q8_0": 1, "F32": 1}
    source, written = gguf.GGUFReader(tmp_path / "small.gguf"), gguf.GGUFReader(tmp_path / "f32.gguf")
    for tensor, original in zip(written.tensors, source.tensors):
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tensor.data, dequantize(original.data, original.tensor_type))
    assert written.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert written.fields["llama.context_length"].contents() == 128
    assert written.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "b"]
