"""The fast paths of the transformers backend: target-only log-probs, length buckets, the
hardware's native dtype and one-line generation give what the plain computation gives."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig, LlamaConfig, PhiConfig

from raghub.kits import pretrained
from raghub.plugins.models import huggingface
from raghub.plugins.models.huggingface import HuggingFaceCausal, LineEnd, TransformersLM, length_buckets
from raghub.kits.pretrained import native_dtype
from raghub.settings import read_task_definition
from test_models import save_tiny_model

TASKS = Path(__file__).resolve().parents[1] / "tasks"
SEQUENCES = [[2, 3, 2], [3, 2, 2, 3, 3, 2, 3], [2, 3], [3, 3, 3, 2, 2], [2, 2, 3, 3, 2, 3, 2, 2, 3]]
STARTS = [1, 4, 1, 2, 3]


def full_logits_logprobs(hf_model, sequence, start):
    """ln p of sequence[start:] from the whole model's logits, one sequence at a time."""
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([sequence])).logits[0, start - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(sequence[start:])[:, None])[:, 0]


def tiny_model(tmp_path, config=None, token_budget=None):
    """The tiny random Llama of test_models with its tokenizer, or another architecture's
    random model of the same size behind that tokenizer."""
    save_tiny_model(tmp_path, seed=0)
    model = HuggingFaceCausal().load(str(tmp_path), "cpu", "float32", 2)
    if config is not None:
        torch.manual_seed(0)
        model = TransformersLM(AutoModelForCausalLM.from_config(config), model.tokenizer, "tiny")
    model.token_budget = token_budget or model.token_budget
    return model


def test_length_buckets_go_longest_first_within_the_budget():
    assert length_buckets([3, 9, 5, 9, 1], 18) == [[1, 3], [2, 0, 4]]
    assert length_buckets([30, 2], 18) == [[0], [1]]  # longer than the budget: alone


@pytest.mark.parametrize("token_budget, chunk_rows", [(7, None), (4096, None), (4096, 3)])
def test_target_only_logprobs_equal_full_logits_in_the_original_order(tmp_path, monkeypatch, token_budget,
                                                                       chunk_rows):
    model = tiny_model(tmp_path, token_budget=token_budget)
    if chunk_rows:  # several chunks through the reused buffers, the last one partly filled
        monkeypatch.setattr(huggingface, "LOGIT_CHUNK", chunk_rows * model.hf_model.config.vocab_size)
    assert model.target_only
    scored = model.sequence_logprobs(SEQUENCES, STARTS)
    for sequence, start, ours in zip(SEQUENCES, STARTS, scored):
        assert ours.shape == (len(sequence) - start,)
        assert torch.allclose(ours, full_logits_logprobs(model.hf_model, sequence, start), atol=1e-5)


SMALL = {"vocab_size": 4, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "pad_token_id": 0}


@pytest.mark.parametrize("config, target_only", [
    (Gemma2Config(**SMALL, final_logit_softcapping=0.05), True),  # capped below the logits' size
    (GraniteConfig(**SMALL, logits_scaling=4.0), False),  # logits / 4: scored from full logits
    (LlamaConfig(**SMALL), True),
    (PhiConfig(**SMALL), True),  # an output embedding with a bias
])
def test_soft_capped_and_scaled_logits_are_scored_as_the_model_computes_them(tmp_path, config, target_only):
    model = tiny_model(tmp_path, config)
    head = model.hf_model.get_output_embeddings()
    if head.bias is not None:  # transformers initialises it to zeros
        torch.nn.init.normal_(head.bias)
    assert model.target_only is target_only
    for sequence, start, ours in zip(SEQUENCES, STARTS, model.sequence_logprobs(SEQUENCES, STARTS)):
        assert torch.allclose(ours, full_logits_logprobs(model.hf_model, sequence, start), atol=1e-5)


@pytest.mark.parametrize("config", [None, GraniteConfig(**SMALL, logits_scaling=4.0)])
def test_scoring_keeps_no_key_value_cache(tmp_path, monkeypatch, config):
    """Regression: scoring (and full logits, and answer scores) ran the decoder with
    transformers' default use_cache=True, holding every layer's keys and values of the whole
    batch until the pass ended (GBs at a GPU's token budget)."""
    model = tiny_model(tmp_path, config)
    assert model.target_only is (config is None)
    decoder = model.hf_model.get_decoder()
    forward, asked = decoder.forward, []
    monkeypatch.setattr(decoder, "forward", lambda *args, **kwargs: asked.append(kwargs.get("use_cache")) or
                        forward(*args, **kwargs))
    model.sequence_logprobs(SEQUENCES, STARTS)
    model.logits(SEQUENCES)
    model.answer_scores(["hello world"], ["hello"])
    assert len(asked) >= 3 and all(flag is False for flag in asked)


@pytest.mark.parametrize("flags, dtype", [("fpu avx512f avx512_bf16 sse", "bfloat16"),
                                          ("fpu amx_tile amx_bf16", "bfloat16"),
                                          ("fpu avx512f avx2", "float32")])
def test_auto_dtype_is_bfloat16_only_on_a_cpu_that_computes_it(tmp_path, monkeypatch, flags, dtype):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(pretrained, "CPUINFO", cpuinfo)
    assert native_dtype(torch.device("cpu")) == dtype
    monkeypatch.setattr(pretrained, "CPUINFO", tmp_path / "missing")
    assert native_dtype(torch.device("cpu")) == "float32"


class TextTokenizer:
    """Decodes a row of ids as the characters they are."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(map(chr, row.tolist())) for row in rows]


def test_a_line_ends_at_the_first_newline_after_non_space_text():
    rows = ["ab\n\nParis\nQu", "ab\n\n Paris", "ab  \n\n ", "abParis\n"]
    ids = torch.tensor([[ord(ch) for ch in row.ljust(12)] for row in rows])
    assert LineEnd(TextTokenizer(), 2)(ids, None).tolist() == [True, False, False, True]


def test_generation_from_the_shared_prefix_cache_equals_generating_each_prompt_whole(tmp_path, monkeypatch):
    """Prompts sharing 20 leading tokens, of different lengths, in 2 padded batches (token budget):
    the prefix is run once and each batch continues from a copy of its cache; the greedy
    tokens and their log-probs equal the plain left-padded generation's."""
    from raghub.plugins.models import huggingface

    model = tiny_model(tmp_path, token_budget=64)
    shared = " ".join(["hello", "world", "world", "hello"] * 5)
    prompts = [f"{shared} {rest}" for rest in ("hello", "world hello world", "world", "hello hello world world hello")]
    assert model.shared_prefix([model.encode(p) for p in prompts])[0] == 20
    reused = model.generate(prompts, 6)
    monkeypatch.setattr(huggingface, "MIN_SHARED_PREFIX", 10**9)
    assert model.shared_prefix([model.encode(p) for p in prompts]) == (0, None)
    whole = model.generate(prompts, 6)
    assert [g.text for g in reused] == [g.text for g in whole]
    for ours, plain in zip(reused, whole):
        assert ours.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-5)
    assert [len(batch) for batch in length_buckets([len(model.encode(p)) + 6 for p in prompts], 64)] == [2, 2]


@pytest.fixture(scope="module")
def model():
    from raghub.models import load_model

    return load_model(None)


@pytest.mark.real_model
def test_real_model_target_only_equals_full_logits(model):
    from raghub.plugins.tasks.language_modelling import LanguageModelling

    data_dir = os.environ.get("RAGHUB_DATA_DIR", "../shared/data")
    if not (Path(data_dir) / "wikitext").is_dir():
        pytest.skip("needs RAGHUB_DATA_DIR with wikitext/")
    task = LanguageModelling("wikitext2", read_task_definition(TASKS / "wikitext2.yaml"), data_dir,
                             context_len=32, pred_len=63)
    windows = task.examples(model, 3)[1:]  # the first has no context
    sequences = [w.context_ids + w.target_ids for w in windows]
    starts = [len(w.context_ids) for w in windows]
    assert model.target_only and model.dtype == "float32"
    for sequence, start, ours in zip(sequences, starts, model.sequence_logprobs(sequences, starts)):
        assert torch.allclose(ours, full_logits_logprobs(model.hf_model, sequence, start), atol=1e-5)


@pytest.mark.real_model
def test_real_model_one_line_generation_gives_the_same_answers_sooner(model):
    from raghub import PromptTemplate, Question

    template = PromptTemplate("completion", (("Who wrote the novel Nineteen Eighty-Four?", "George Orwell"),))
    questions = [Question(id=str(n), query=q, question=q, template=template)
                 for n, q in enumerate(["What is the capital of France?", "Who painted the Mona Lisa?",
                                        "In which year did the Second World War end?"])]
    prompts = [q.prompt([]) for q in questions]
    full, short = model.generate(prompts, 16), model.generate_line(prompts, 16)
    assert [q.extract(g.text) for q, g in zip(questions, short)] == [q.extract(g.text) for q, g in zip(questions, full)]
    for whole, line in zip(full, short):
        assert whole.token_logprobs[: len(line.token_logprobs)] == pytest.approx(line.token_logprobs, abs=1e-4)
    assert sum(len(g.token_logprobs) for g in short) < sum(len(g.token_logprobs) for g in full)
