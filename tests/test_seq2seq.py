"""The `hf-seq2seq` backend and Fusion-in-Decoder, on a tiny random T5 saved as a user's folder:
which backend loads which folder, answer scoring and greedy generation against direct
`model(...)` calls, REPLUG over seq2seq answers, FiD against decoding concatenated encoder
states, and the refusals (FiD with a causal model, language modelling with a seq2seq one)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from raghub import Passage, PromptTemplate, Question, Retrieved
from raghub.cache import Cache
from raghub.cli import cli
from raghub.models import choose_backend
from raghub.plugins.methods.ensemble import Ensemble
from raghub.plugins.methods.fid import FusionInDecoder
from raghub.plugins.models.huggingface import HuggingFaceCausal
from raghub.plugins.models.seq2seq import HuggingFaceSeq2Seq
from raghub.progress import RunProgress, run_progress
from bad_input import assert_one_line_exit_2, model_never_loads  # noqa: F401 (model_never_loads: a fixture)
from test_models import cache_dir, save_tiny_model  # noqa: F401 (cache_dir: a fixture)

WORDS = "Passage Question Answer : the tower is in Paris France river Nile Egypt where which city".split()
TEMPLATE = PromptTemplate(style="completion")


def word_tokenizer(words, specials=("[PAD]", "</s>", "[UNK]"), post_processor=None,
                   **roles) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `specials` then `words` (punctuation split off), framing each
    input by `post_processor`. By default it is T5-like: [PAD] 0, </s> 1 (ending every encoder
    input), [UNK] 2."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = post_processor or processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   **(roles or {"eos_token": "</s>"}))


def save_tiny_t5(folder: Path, words=WORDS, seed: int = 1, d_model: int = 32, init_scale: float = 16.0) -> Path:
    """A 2-layer random T5 and its word-level tokenizer, saved as a user's model folder. Its
    weights start `init_scale` times T5's scale, so that it says varied things rather than
    ending at once."""
    tokenizer = word_tokenizer(words)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      initializer_factor=init_scale)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def t5_folder(tmp_path):
    return save_tiny_t5(tmp_path / "t5")


@pytest.fixture
def t5(t5_folder, cache_dir):
    return HuggingFaceSeq2Seq().load(str(t5_folder), "cpu", "float32", batch_size=2)


def question(text: str, **fields) -> Question:
    return Question(id=text, query=text, question=text, answers=["Paris"], template=TEMPLATE,
                    max_new_tokens=4, **fields)


def greedy_by_hand(t5, encoder_states, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding one step at a time over unpadded encoder states [1, L, d]: the
    generated ids (up to the end token) and their log-probs."""
    ids, logprobs = [0], []  # T5 starts from the padding token
    for _ in range(steps):
        with torch.no_grad():
            logits = t5.hf_model(encoder_outputs=(encoder_states,), decoder_input_ids=torch.tensor([ids])).logits
        step = logits[0, -1].log_softmax(-1)
        token = int(step.argmax())
        if token in (0, 1):
            break
        ids.append(token)
        logprobs.append(float(step[token]))
    return ids[1:], logprobs


def encoded(t5, prompt: str):
    """The encoder states of one prompt, tokenised alone (no padding): [1, L, d]."""
    inputs = t5.tokenizer([prompt], return_tensors="pt")
    return t5.hf_model.get_encoder()(**inputs).last_hidden_state


def test_an_encoder_decoder_folder_goes_to_hf_seq2seq_and_only_there(host, t5_folder, tmp_path):
    save_tiny_model(tmp_path / "llama", seed=0)
    found = host.registry
    assert isinstance(choose_backend(found, str(t5_folder)), HuggingFaceSeq2Seq)
    assert not HuggingFaceCausal.handles(str(t5_folder))
    assert isinstance(choose_backend(found, str(tmp_path / "llama")), HuggingFaceCausal)
    assert isinstance(choose_backend(found, "google-t5/t5-small"), HuggingFaceCausal)  # a hub id: by name only
    assert isinstance(choose_backend(found, "google-t5/t5-small", "hf-seq2seq"), HuggingFaceSeq2Seq)
    assert "sequence_logprobs" not in HuggingFaceSeq2Seq.provides and "encoder_states" in HuggingFaceSeq2Seq.provides
    assert "sequence_logprobs" in HuggingFaceCausal.provides and "encoder_states" not in HuggingFaceCausal.provides


def test_answer_scoring_equals_a_direct_forward_pass(t5):
    prompts = ["Question : where is the tower ?", "the Nile"]
    answers = ["Paris France", "Egypt"]
    scored = t5.continuation_logprobs(prompts, answers)
    trained = t5.answer_scores(prompts, answers)
    assert trained.stop_ids == [t5.tokenizer.eos_token_id]
    for prompt, answer, row, row_with_end, positions in zip(prompts, answers, scored, trained.token_logprobs,
                                                            trained.position_logprobs):
        labels = t5.tokenizer([answer], return_tensors="pt")["input_ids"]  # the answer, then </s>
        logits = t5.hf_model(**t5.tokenizer([prompt], return_tensors="pt"), labels=labels).logits
        direct = logits[0].log_softmax(-1).gather(-1, labels[0, :, None])[:, 0]
        assert torch.allclose(row, direct[:-1], atol=1e-5)  # the answer's tokens only
        assert torch.allclose(row_with_end[: len(direct)], direct, atol=1e-5)
        assert row_with_end[len(direct):].eq(0).all()  # padding scores nothing
        assert torch.allclose(positions, logits[0].log_softmax(-1), atol=1e-5)


def test_batched_greedy_generation_equals_step_by_step_decoding(t5):
    prompts = ["Question : which city ?", "the tower is in Paris France", "Nile",  # padded, 2 batches
               "Passage 1: the Nile\n\nQuestion: where is the tower ?\nAnswer:"]
    generations = t5.generate(prompts, max_new_tokens=5)
    lengths = []
    for prompt, generation in zip(prompts, generations):
        ids, logprobs = greedy_by_hand(t5, encoded(t5, prompt), steps=5)
        assert generation.text == t5.decode(ids)
        assert generation.token_logprobs == pytest.approx(logprobs, abs=1e-5)
        lengths.append(len(ids))
    assert 5 in lengths and 0 < min(lengths) < 5  # full-length answers and one cut at its end


def test_generation_and_scoring_report_each_pass_to_the_runs_bar(t5, monkeypatch):
    """Each `batch_size` pass is reported as it finishes, and the calls return the same."""
    prompts = ["the tower is in", "where is the river", "which city"]
    alone = t5.generate(prompts, 3), t5.continuation_logprobs(prompts, [" Paris"] * 3)
    reported = []
    monkeypatch.setattr(RunProgress, "items_finished", lambda self, items: reported.append(items))
    with run_progress("t · m", 0, [3], 3) as run, run.batch():
        generated, scored = t5.generate(prompts, 3), t5.continuation_logprobs(prompts, [" Paris"] * 3)
    assert reported == [2, 1, 2, 1]  # two passes of batch_size 2 (and 1) in each call
    assert generated == alone[0] and [t.tolist() for t in scored] == [t.tolist() for t in alone[1]]


def test_the_replug_vote_over_seq2seq_answers_matches_hand_computed_weights(t5, cache_dir):
    passages = [Passage("a", "the tower is in Paris"), Passage("b", "the Nile is in Egypt"),
                Passage("c", "which river")]
    scores = [2.0, 0.5, -1.0]
    q = question("where is the tower ?")
    answer = Ensemble(t5, Cache(cache_dir)).answer([q], [[Retrieved(p, s) for p, s in zip(passages, scores)]])[0]
    totals = {}
    for passage, score in zip(passages, scores):
        ids, logprobs = greedy_by_hand(t5, encoded(t5, q.prompt([passage])), steps=4)
        weight = math.exp(score) / sum(math.exp(s) for s in scores)
        text = q.extract(t5.decode(ids)).lower()
        totals[text] = totals.get(text, 0.0) + weight * math.exp(sum(logprobs) / len(logprobs))
    assert len(totals) > 1 and answer.lower() == max(totals, key=totals.__getitem__)


def test_fid_equals_decoding_the_concatenated_encoder_states(t5, cache_dir):
    questions = [question("where is the tower ?"), question("which river ?")]
    retrieved = [[Retrieved(Passage("a", "the tower is in Paris France"), 1.0),
                  Retrieved(Passage("b", "Nile"), 0.5)],
                 [Retrieved(Passage("c", "the Nile is in Egypt"), 1.0), Retrieved(Passage("d", "river"), 0.9),
                  Retrieved(Passage("e", "Paris"), 0.1)]]
    fid = FusionInDecoder(t5, Cache(cache_dir))
    answers = fid.answer(questions, retrieved)
    states, mask = fid.fused_states([[q.prompt([r.passage]) for r in docs] for q, docs in zip(questions, retrieved)])
    for row, (q, docs, answer) in enumerate(zip(questions, retrieved, answers)):
        concatenated = torch.cat([encoded(t5, q.prompt([r.passage])) for r in docs], dim=1)
        length = concatenated.shape[1]
        assert torch.allclose(states[row, :length], concatenated[0], atol=1e-5) and mask[row].sum() == length
        ids, _ = greedy_by_hand(t5, concatenated, steps=q.max_new_tokens)
        assert ids and answer == q.extract(t5.decode(ids))


def test_fid_with_a_causal_model_is_exit_2_before_loading(tmp_path, cache_dir, model_never_loads):
    save_tiny_model(tmp_path / "llama", seed=0)
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", "fid", "--model", str(tmp_path / "llama"),
                                      "--results-dir", str(tmp_path / "results")])
    assert_one_line_exit_2(result, "method 'fid' needs a model that provides encoder_states (an encoder-decoder's "
                                   "encoder outputs", tmp_path / "results")
    assert "model backend 'hf-causal' provides only" in result.output


def test_a_chat_template_free_tokenizer_gets_the_plain_message(t5):
    assert t5.chat_prompt("Question : where ?") == "Question : where ?"


@pytest.mark.parametrize("model_args", [["FOLDER"], ["google-t5/t5-small", "--model-backend", "hf-seq2seq"]])
def test_language_modelling_with_a_seq2seq_model_is_exit_2_before_loading(t5_folder, tmp_path, monkeypatch,
                                                                          model_args):
    monkeypatch.setattr(HuggingFaceSeq2Seq, "load", lambda *a, **k: pytest.fail("model loaded"))
    model = [str(t5_folder) if arg == "FOLDER" else arg for arg in model_args]
    result = CliRunner().invoke(cli, ["run", "--task", "wikitext2", "--method", "none", "--model", *model,
                                      "--results-dir", str(tmp_path / "results")])
    assert_one_line_exit_2(result, "task 'wikitext2' (language-modelling) needs a model that provides "
                                   "sequence_logprobs", tmp_path / "results")


@pytest.mark.parametrize("method", ["none", "incontext", "ensemble"])
def test_the_qa_methods_run_squad_with_a_seq2seq_folder(t5_folder, tmp_path, cache_dir, method):
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", method, "--model", str(t5_folder),
                                      "--n-docs", "2", "--limit", "2", "--json",
                                      "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n_examples"] == 2 and record["config"]["model_backend"]["name"] == "hf-seq2seq"
    assert 0 <= record["metrics"]["f1"] <= 1
