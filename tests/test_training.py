"""`raghub train`: the penalties against hand-computed values and on toy cases, gradients reaching
the retriever, checkpoints that `raghub run --checkpoint` evaluates, resuming after SIGKILL, and
the same loss trajectory with 1 and 2 DDP processes, all on tiny random models."""

import builtins
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raghub.cache import fingerprint
from raghub.checkpoints import GENERATOR, MANIFEST, QUERY_ENCODER, TRAIN_LOG, read_checkpoint, write_checkpoint
from raghub.cli import cli
from raghub.errors import RunError, UsageError
from raghub.plugins.models.huggingface import HuggingFaceCausal
from raghub.plugins.training.rag.penalties import keyword_mass, length_penalty, repetition_unlikelihood
from raghub.plugins.training.rag import trainer as trainer_module
from raghub.plugins.training.rag.trainer import TrainConfig, Trainer, keep_log_until
from raghub.plugin_manager import PluginHost

from bad_input import assert_one_line_exit_2, model_never_loads  # noqa: F401 (a fixture)

ROOT = Path(__file__).parents[1]
PYTHON_BIN = Path(sys.executable).parent

# --- the penalties: hand-computed on a 3-token target over a 4-token vocabulary ----------------

PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.2], [0.25, 0.25, 0.4, 0.1]])


def test_repetition_unlikelihood_hand_computed():
    # target 1, 2, 1: position 1 has candidate 1 (already written), position 2 candidate 2
    # (1 is the target itself): mean(−ln(1 − 0.1), −ln(1 − 0.4))
    value = repetition_unlikelihood(PROBS.log(), [1, 2, 1])
    assert value.item() == pytest.approx((-math.log(0.9) - math.log(0.6)) / 2, abs=1e-6)
    # bigrams: target 2, 2, 3: at position 2 the context (2) was followed by 2 before -> −ln(1 − 0.4)
    assert repetition_unlikelihood(PROBS.log(), [2, 2, 3], n=2).item() == pytest.approx(-math.log(0.6), abs=1e-6)
    assert repetition_unlikelihood(PROBS.log(), [0, 1, 2], n=2).item() == 0.0  # no bigram context repeats


def test_keyword_mass_hand_computed():
    # keywords 0 and 3: mean(0.1 + 0.4, 0.5 + 0.2, 0.25 + 0.1)
    assert keyword_mass(PROBS.log(), [0, 3]).item() == pytest.approx((0.5 + 0.7 + 0.35) / 3, abs=1e-6)


def test_length_penalty_hand_computed():
    # stop token 0: p(stop) = 0.1, 0.5, 0.25 -> going on 0.9, 0.45, 0.3375
    assert length_penalty(PROBS.log(), [0]).item() == pytest.approx((0.9 + 0.45 + 0.3375) / 3, abs=1e-6)


PENALISED = {  # penalty, and what it measures on the toy: the probability of the penalised tokens
    "repetition": (lambda lp: repetition_unlikelihood(lp, [1, 2, 1]), lambda p: p[1, 1] + p[2, 2]),
    "keyword": (lambda lp: keyword_mass(lp, [0, 3]), lambda p: (p[:, 0] + p[:, 3]).mean()),
    "length": (lambda lp: length_penalty(lp, [0]), lambda p: 1 - p[:, 0].mean()),
}


@pytest.mark.parametrize("name", PENALISED)
def test_a_penalty_has_gradients_and_a_few_steps_lower_the_behaviour(name):
    penalty, behaviour = PENALISED[name]
    logits = torch.nn.Parameter(PROBS.log().clone())
    first = penalty(logits.log_softmax(-1))
    first.backward()
    assert logits.grad.abs().sum() > 0
    before = behaviour(logits.softmax(-1)).item()
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        penalty(logits.log_softmax(-1)).backward()
        optimizer.step()
    assert penalty(logits.log_softmax(-1)).item() < first.item()
    assert behaviour(logits.softmax(-1)).item() < before


def test_the_objectives_are_the_core_formulas(host):
    from raghub import lsr_kl, rag_sequence_logprob, rag_token_logprob

    scores, doc = torch.tensor([[0.3, 0.1]]), torch.log(torch.tensor([[[0.5, 0.4, 0.2], [0.2, 0.5, 0.6]]]))
    objectives = host.registry.objectives
    assert objectives["rag-sequence"]().loss(scores, doc).item() == pytest.approx(
        -rag_sequence_logprob(doc, scores, 0.1).item())
    assert objectives["rag-token"](temperature=1.0).loss(scores, doc).item() == pytest.approx(
        -rag_token_logprob(doc, scores).item())
    assert objectives["lsr"]().loss(scores, doc).item() == pytest.approx(lsr_kl(scores, doc.sum(-1), 0.1, 0.1).item())
    assert not objectives["lsr"].trains_generator


# --- tiny models and a tiny SQuAD ------------------------------------------------------------

ARTICLES = {
    "Rivers": [("The Nile flows north through Egypt", [("Where does the Nile flow", "north"),
                                                       ("Which country does the Nile cross", "Egypt")]),
               ("The Amazon is in Brazil", [("Where is the Amazon", "Brazil")])],
    "Cities": [("Paris is the capital of France", [("What is the capital of France", "Paris")]),
               ("Ulm is where Einstein was born", [("Where was Einstein born", "Ulm")])],
    "Towers": [("The Eiffel tower is iron", [("What is the Eiffel tower made of", "iron")])],
}
WORDS = sorted({w for article in ARTICLES.values() for text, qas in article
                for w in (text + " " + " ".join(q + " " + a for q, a in qas)).split()}
               | {"Question:", "Answer:", "Passage", "1:", "Rivers", "Cities", "Towers"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SQuAD file (three articles), a task over its first two articles, a 2-layer
    random Llama and a 2-layer random BERT encoder."""
    root = tmp_path_factory.mktemp("tiny")
    data = {"data": [{"title": title, "paragraphs": [
        {"context": text, "qas": [{"id": f"{title}{i}{j}", "question": q + "?", "answers": [{"text": a}]}
                                  for j, (q, a) in enumerate(qas)]} for i, (text, qas) in enumerate(paragraphs)]}
        for title, paragraphs in ARTICLES.items()]}
    (root / "data" / "tiny").mkdir(parents=True)
    (root / "data" / "tiny" / "tiny.json").write_text(json.dumps(data))
    (root / "tiny-train.yaml").write_text(
        "name: tiny-train\nfamily: qa\nprompt: completion\nmax_new_tokens: 3\n"
        "data: {folder: tiny, file: tiny.json, format: squad}\narticles: {first: 0, last: 1}\n")
    vocab = {"[PAD]": 0, "[UNK]": 1, "\n": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
                                                     pre_tokenizers.Split("\n", behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab) + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=0)
                     ).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[w.lower() for w in WORDS]]))
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "bert")
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(root / "bert")
    return root


def train_args(tiny, output, *extra):
    return ["--task", str(tiny / "tiny-train.yaml"), "--output", str(output), "--model", str(tiny / "llama"),
            "--encoder", str(tiny / "bert"), "--data-dir", str(tiny / "data"), "--n-docs", "2",
            "--batch-size", "2", "--lora-targets", "q_proj,v_proj", "--learning-rate", "0.01",
            "--retriever-learning-rate", "0.001", *extra]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    return {**os.environ, "RAGHUB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}


def trainer_config(tiny, output, **settings) -> TrainConfig:
    return TrainConfig(task=str(tiny / "tiny-train.yaml"), output=str(output), model=str(tiny / "llama"),
                       encoder=str(tiny / "bert"), data_dir=str(tiny / "data"), n_docs=2, batch_size=2,
                       lora_targets="q_proj,v_proj", learning_rate=0.01, retriever_learning_rate=0.001, **settings)


def trainer(tiny, tmp_path, **settings):
    return Trainer(trainer_config(tiny, tmp_path / "out", **settings), PluginHost().registry)


def gradient_norms(model):
    return {name: sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
            for name, module in (("query", model.query_encoder), ("passage", model.passage_encoder),
                                 ("generator", model.generator)) if module is not None}


@pytest.mark.parametrize("objective", ["rag-sequence", "rag-token", "lsr"])
def test_the_gradient_reaches_the_query_encoder_and_the_generator(tiny, tmp_path, env, objective):
    train = trainer(tiny, tmp_path, objective=objective, penalty="repetition=0.1,keyword=0.1,length=0.05")
    loss, parts = train.model(train.batch(1), "joint" if objective != "lsr" else "retriever")
    loss.backward()
    norms = gradient_norms(train.model)
    assert norms["query"] > 0
    assert (norms["generator"] > 0) == (objective != "lsr")
    assert {"objective", "length"} <= parts.keys() if objective != "lsr" else parts.keys() == {"objective"}


def test_with_train_passages_the_passage_encoder_gets_gradients_and_refreshes(tiny, tmp_path, env):
    train = trainer(tiny, tmp_path, train_passages=True)
    loss, _ = train.model(train.batch(1), "joint")
    loss.backward()
    assert gradient_norms(train.model)["passage"] > 0
    before = train.model.passage_matrix.clone()
    train.optimizers["retriever"].step()
    train.model.refresh_index()
    assert not torch.allclose(before, train.model.passage_matrix)


def test_alternating_phases_freeze_the_other_side(tiny, tmp_path, env):
    train = trainer(tiny, tmp_path, alternate=2)
    assert [train.phase(s) for s in range(1, 7)] == ["retriever"] * 2 + ["generator"] * 2 + ["retriever"] * 2
    for phase, trained in (("retriever", "query"), ("generator", "generator")):
        for optimizer in train.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        train.model(train.batch(1), phase)[0].backward()
        assert {name for name, norm in gradient_norms(train.model).items() if norm > 0} == {trained}


def test_gradient_accumulation_gives_the_larger_batchs_losses(host, tiny, tmp_path, env):
    """2 accumulated batches of 1 question step exactly as 1 batch of 2 (float32, 1e-5)."""
    trajectories, batches = [], []
    for name, settings in (("whole", {"batch_size": 2}), ("accumulated", {"batch_size": 1, "grad_accum": 2})):
        train = Trainer(replace(trainer_config(tiny, tmp_path / name), steps=3, save_every=3, **settings), host.registry)
        batches.append([q.id for part in range(train.config.grad_accum) for q in train.batch(2, part)])
        train.train()
        trajectories.append(losses(tmp_path / name))
    assert batches[0] == batches[1]
    assert trajectories[1] == pytest.approx(trajectories[0], abs=1e-5)
    assert trajectories[0][0] != trajectories[0][-1]


def test_the_learning_rates_warm_up_linearly_then_stay(host, tiny, tmp_path, env):
    train = Trainer(replace(trainer_config(tiny, tmp_path / "out"), warmup_steps=4, steps=6, save_every=6,
                            learning_rate=0.01, retriever_learning_rate=0.001), host.registry)
    rates = []
    for step in range(1, 7):
        rates.append([group["lr"] for optimizer in train.optimizers.values() for group in optimizer.param_groups])
        train.run_step(step)
    assert [r[0] for r in rates] == pytest.approx([0.00025, 0.0005, 0.00075, 0.001, 0.001, 0.001])
    assert [r[1] for r in rates] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_the_split_keeps_training_and_evaluation_articles_apart(tiny, tmp_path, env):
    train = trainer(tiny, tmp_path)
    assert sorted(q.id[:-2] for q in train.questions) == ["Cities"] * 2 + ["Rivers"] * 3
    assert len(train.model.passages) == 5  # the corpus is every article's paragraphs
    assert train.manifest()["trained_on"]["articles"] == {"first": 0, "last": 1}


def test_train_writes_a_checkpoint_that_run_evaluates(tiny, tmp_path, env):
    output = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "3", "--save-every", "2",
                                                          "--penalty", "length=0.05")])
    assert result.exit_code == 0, result.output
    checkpoint = read_checkpoint(output)
    assert checkpoint.manifest["step"] == 3 and checkpoint.folder.name == "step-000003"
    assert checkpoint.part(GENERATOR) and checkpoint.part(QUERY_ENCODER)
    assert sorted(p.name for p in output.iterdir()) == [MANIFEST, "step-000003", TRAIN_LOG]
    log = [json.loads(line) for line in (output / TRAIN_LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(math.isfinite(e["loss"]) and "length" in e for e in log)
    assert checkpoint.manifest["config"]["penalty"] == "length=0.05"
    task = tiny / "tiny-eval.yaml"
    task.write_text((tiny / "tiny-train.yaml").read_text().replace("tiny-train", "tiny-eval")
                    .replace("{first: 0, last: 1}", "{first: 2, last: 2}"))
    run = CliRunner().invoke(cli, ["run", "--task", str(task), "--method", "rag-sequence", "--retriever", "dense",
                                   "--encoder", str(tiny / "bert"), "--model", str(tiny / "llama"), "--n-docs", "2",
                                   "--checkpoint", str(output), "--data-dir", str(tiny / "data"), "--json",
                                   "--results-dir", str(tmp_path / "results")])
    assert run.exit_code == 0, run.output
    record = json.loads(run.stdout)
    assert record["method_stats"]["trained_on"]["task"] == "tiny-train"
    assert record["method_stats"]["training_steps"] == 3 and record["n_examples"] == 1
    assert record["config"]["retriever"]["checkpoint"] == checkpoint.identity


# --- a checkpoint evaluated in sweeps and stored runs: its weights are part of the model -------

@pytest.fixture(scope="module")
def tiny_lm(tiny):
    """A tiny language-modelling task over the articles' sentences (retrieving from the
    questions), where any change to the weights changes the perplexity."""
    texts = {"test": [line for title, paragraphs in ARTICLES.items()
                      for line in (f" = {title} = ", *(f" {text} ." for text, _ in paragraphs))],
             "train": [" ".join(q for _, qas in paragraphs for q, _ in qas) for paragraphs in ARTICLES.values()]}
    for split, rows in texts.items():
        (tiny / "data" / "tiny" / f"lm.{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    task = tiny / "tiny-lm.yaml"
    task.write_text("name: tiny-lm\nfamily: language-modelling\n"
                    "data: {hub: none, config: tiny, folder: tiny, files: {test: [lm.test.jsonl], train: [lm.train.jsonl]}}\n"
                    "passages: {words: 6, min_words: 3}\nwindows: {context_len: 4, pred_len: 5, retrieved_max_length: 8}\n"
                    "ralm: {query_len: 4, max_length: 32, retrieved_max_length: 8}\n")
    return task


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A checkpoint of 2 steps (LoRA generator and query encoder)."""
    output = tmp_path_factory.mktemp("trained") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAGHUB_CACHE", str(output.parent / "cache"))
        result = CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "2")])
    assert result.exit_code == 0, result.output
    return output


def evaluate(tiny, task, results, *extra, method="rag-sequence", n_docs="2", retriever="dense"):
    """`raghub run` of the tiny model on `task`; its records, one per run."""
    encoder = ["--encoder", str(tiny / "bert")] if retriever == "dense" else []
    result = CliRunner().invoke(cli, ["run", "--task", str(task), "--method", method, "--retriever", retriever,
                                      *encoder, "--model", str(tiny / "llama"), "--n-docs", n_docs,
                                      "--data-dir", str(tiny / "data"), "--json", "--results-dir", str(results),
                                      *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_sweep_applies_the_trained_generator_once(tiny, tiny_lm, trained, tmp_path, env):
    """Regression: the sweep's second run merged the adapter again into the model it shared."""
    swept = evaluate(tiny, tiny_lm, tmp_path / "sweep", "--checkpoint", str(trained), n_docs="1,2")
    (alone,) = evaluate(tiny, tiny_lm, tmp_path / "alone", "--checkpoint", str(trained), n_docs="2")
    assert [r["n_docs"] for r in swept] == [1, 2]
    assert swept[1]["metrics"] == pytest.approx(alone["metrics"], rel=1e-6)
    assert swept[1]["config"]["model_fingerprint"] == alone["config"]["model_fingerprint"]


def test_a_method_that_reads_no_generator_checkpoint_runs_on_the_base_weights(tiny, tiny_lm, trained, tmp_path, env):
    """Regression: `incontext` after `rag-sequence --checkpoint` in one sweep was scored on the
    trained weights while its record named the base model."""
    rag, incontext = evaluate(tiny, tiny_lm, tmp_path / "sweep", "--checkpoint", str(trained),
                              method="rag-sequence,incontext")
    # alone, incontext reads the checkpoint's query encoder (dense declares --checkpoint) and no generator
    (alone,) = evaluate(tiny, tiny_lm, tmp_path / "alone", "--checkpoint", str(trained), method="incontext")
    assert incontext["metrics"] == pytest.approx(alone["metrics"], rel=1e-6)
    base = read_checkpoint(trained).manifest["model_fingerprint"]
    assert incontext["config"]["model_fingerprint"] == alone["config"]["model_fingerprint"] == base
    assert rag["config"]["model_fingerprint"] != base


def test_retraining_the_same_output_to_a_later_step_is_evaluated_anew(tiny, tiny_lm, tmp_path, env):
    """Regression: stored-run reuse and the resume file were keyed by the checkpoint's path, so
    the later save's evaluation reused the earlier save's record."""
    output, results = tmp_path / "out", tmp_path / "results"
    records = []
    for steps in ("1", "2"):
        assert CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", steps)]).exit_code == 0
        records += evaluate(tiny, tiny_lm, results, "--checkpoint", str(output), retriever="bm25")
    first, second = records
    assert second["id"] != first["id"] and second["method_stats"]["training_steps"] == 2
    assert second["config"]["method"]["checkpoint"] == read_checkpoint(output).identity
    assert fingerprint(second["config"]) != fingerprint(first["config"])  # the resume file's name
    assert second["config"]["model_fingerprint"] != first["config"]["model_fingerprint"]


def test_a_checkpoint_missing_a_part_it_declares_is_refused_before_loading(tiny, tiny_lm, trained, tmp_path,
                                                                          env, monkeypatch):
    """Regression: without its generator/ a checkpoint evaluated the base model while the record
    named the checkpoint."""
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    shutil.rmtree(broken / read_checkpoint(trained).folder.name / GENERATOR)
    monkeypatch.setattr(HuggingFaceCausal, "load", lambda *a, **k: pytest.fail("model loaded"))
    result = CliRunner().invoke(cli, ["run", "--task", str(tiny_lm), "--method", "rag-sequence", "--model",
                                      str(tiny / "llama"), "--checkpoint", str(broken), "--data-dir",
                                      str(tiny / "data"), "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 2 and f"lacks {GENERATOR}" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "results").exists()


def test_two_trainings_alike_in_config_and_step_but_not_in_weights_are_told_apart(tmp_path):
    """Regression: a save was identified by its training config's fingerprint and step alone,
    which leave out the data directory, the data's and model folders' content and the code, so
    training again after any of them changed made the same identity: evaluating the new save
    reused the old one's stored run and cached passage embeddings."""
    def save(output, weights):
        def parts(folder):
            (folder / QUERY_ENCODER).mkdir()
            (folder / QUERY_ENCODER / "model.safetensors").write_bytes(weights)
        write_checkpoint(output, 1, {"fingerprint": "one-config", "config": {}}, parts)
        return read_checkpoint(output).identity

    assert save(tmp_path / "first", b"old weights") != save(tmp_path / "again", b"new weights")
    assert save(tmp_path / "copy", b"new weights") == read_checkpoint(tmp_path / "again").identity


@pytest.mark.parametrize("damage", [{"fingerprint": None}, {"step": "two"}])
def test_a_manifest_without_its_identity_is_refused(trained, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, **damage}))
    with pytest.raises(UsageError, match="damaged"):
        read_checkpoint(copy)


@pytest.mark.parametrize("extra, message", [
    (["--passage-encoder", "x"], "--passage-encoder: retriever 'dense' has no such option"),
    (["--retriever", "bm25"], "retriever 'bm25' has no trainable encoders"),
    (["--lora-targets", "nosuch"], "--lora-targets nosuch:"),
    (["--mixed-precision", "fp8"], "Invalid value for '--mixed-precision'"),
])
def test_bad_training_settings_are_one_line_exit_2_and_write_nothing(tiny, tmp_path, env, extra, message):
    """Regression (first case): a passage encoder given to a single-encoder retriever was
    silently ignored."""
    output = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "1"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not output.exists()


def test_a_task_without_questions_is_refused_before_the_model_loads(model_never_loads, tmp_path):
    """Regression: the trainer loaded the model before it found that wikitext2 has no questions."""
    output = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", "--task", "wikitext2", "--output", str(output)])
    assert_one_line_exit_2(result, "task 'wikitext2' (language-modelling) is not scored from answers; raghub train "
                                   "takes question-answering tasks", output)


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--learning-rate must be a finite float, not nan"),
    (["--lr", "-1"], "--learning-rate must be at least 0, not -1.0"),
    (["--retriever-learning-rate", "inf"], "--retriever-learning-rate must be a finite float, not inf"),
    (["--lora-alpha", "0"], "--lora-alpha must be above 0, not 0.0"),
    (["--penalty", "length=-1"], "--penalty length must be at least 0, not -1.0"),
    (["--penalty", "repetition=nan"], "--penalty repetition must be a finite float, not 'nan'"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, not 0"),
])
def test_non_finite_or_nonsensical_training_numbers_are_one_line_before_anything_loads(
        tmp_path, monkeypatch, extra, message):
    """Regression: NaN, negative or infinite learning rates, alphas and penalty weights were
    taken, and trained to NaN weights (or, for the penalties, failed after the models loaded)."""
    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("the trainer started"))
    output = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", "--task", "squad-train", "--output", str(output), *extra])
    assert result.exit_code == 2 and result.output.splitlines() == [f"Error: {message}"], result.output
    assert not output.exists()


def test_a_step_whose_loss_is_not_finite_stops_training_without_saving_or_logging_it(host, tiny, tmp_path, env):
    """Regression: a NaN loss was logged and its weights saved as the next checkpoint."""
    train = Trainer(replace(trainer_config(tiny, tmp_path / "out"), steps=3, save_every=1), host.registry)
    run_step = train.run_step

    def nan_at_step_2(step):
        loss, parts = run_step(step)
        return (loss * math.nan if step == 2 else loss), parts

    train.run_step = nan_at_step_2
    with pytest.raises(RunError, match=r"^step 2: the loss is nan, so training stops; .* keeps its last checkpoint"):
        train.train()
    assert read_checkpoint(tmp_path / "out").manifest["step"] == 1
    assert len(losses(tmp_path / "out")) == 1


def test_a_torn_last_line_of_the_training_log_does_not_block_the_resume(host, tiny, tmp_path, env):
    """Regression: a kill in the middle of writing a log line made every resume a JSONDecodeError."""
    output = tmp_path / "out"
    Trainer(replace(trainer_config(tiny, output), steps=2, save_every=2), host.registry).train()
    with open(output / TRAIN_LOG, "a") as log:
        log.write('{"step": 3, "phase": "jo')
    Trainer(replace(trainer_config(tiny, output), steps=3, save_every=2), host.registry).train()
    assert [json.loads(line)["step"] for line in (output / TRAIN_LOG).read_text().splitlines()] == [1, 2, 3]


def test_a_damaged_line_before_the_last_of_the_training_log_is_one_line_naming_it(tmp_path):
    log = tmp_path / TRAIN_LOG
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(UsageError, match=rf"^{re.escape(str(log))}, line 2: not JSON"):
        keep_log_until(log, 2)


def test_another_configuration_in_the_same_output_is_refused(tiny, tmp_path, env):
    output = tmp_path / "out"
    assert CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "1")]).exit_code == 0
    result = CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "2", "--seed", "7")])
    assert result.exit_code == 2 and "holds a checkpoint of another training configuration" in result.output


@pytest.mark.parametrize("error, shown", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    # how torch's own file writer reports a full disk
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "unexpected pos"),
])
def test_a_full_disk_at_a_save_is_one_line_exit_1_and_keeps_the_previous_save(tiny, tmp_path, env, monkeypatch,
                                                                              error, shown):
    """Regression: ENOSPC while saving a checkpoint was a traceback."""
    output = tmp_path / "out"
    assert CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "1")]).exit_code == 0
    before = {path: path.read_bytes() for path in (output / "step-000001").rglob("*") if path.is_file()}

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    result = CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "2")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # no traceback
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: could not save step 2 in {output}") and shown in last
    assert read_checkpoint(output).manifest["step"] == 1
    assert sorted(p.name for p in output.iterdir()) == [MANIFEST, "step-000001", TRAIN_LOG]
    assert {path: path.read_bytes() for path in (output / "step-000001").rglob("*") if path.is_file()} == before


def test_a_full_disk_at_the_training_log_is_one_line_exit_1_and_keeps_the_last_save(tiny, tmp_path, env,
                                                                                     monkeypatch):
    """Regression: ENOSPC while appending a step to train_log.jsonl was a traceback."""
    output = tmp_path / "out"
    assert CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "1")]).exit_code == 0

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    opened = builtins.open
    monkeypatch.setattr(trainer_module, "open",
                        lambda path, *args, **kwargs: FullDisk() if str(path).endswith(TRAIN_LOG)
                        else opened(path, *args, **kwargs), raising=False)
    result = CliRunner().invoke(cli, ["train", *train_args(tiny, output, "--steps", "2")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # no traceback
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: could not append step 2 to {output / TRAIN_LOG}")
    assert "No space left on device" in last
    assert read_checkpoint(output).manifest["step"] == 1


def losses(output):
    return [json.loads(line)["loss"] for line in (output / TRAIN_LOG).read_text().splitlines()]


def test_a_killed_training_resumes_from_its_last_save_and_repeats_the_same_steps(tiny, tmp_path, env):
    """SIGKILL mid-run loses at most one save interval; the resumed run's losses equal an
    uninterrupted run's step for step (to 1e-5)."""
    steps = 12
    straight = tmp_path / "straight"
    command = [str(PYTHON_BIN / "python"), "-m", "raghub", "train", "--save-every", "3"]
    subprocess.run([*command, *train_args(tiny, straight, "--steps", str(steps))], env=env, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, *train_args(tiny, killed, "--steps", "1000")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not ((killed / TRAIN_LOG).exists() and len(losses(killed)) >= 5):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    logged = len(losses(killed))
    saved = read_checkpoint(killed).manifest["step"]
    assert logged - 3 <= saved <= logged and saved >= 3
    subprocess.run([*command, *train_args(tiny, killed, "--steps", str(steps))], env=env, check=True,
                   capture_output=True)
    assert read_checkpoint(killed).manifest["step"] == steps
    assert losses(killed) == pytest.approx(losses(straight), abs=1e-5)


@pytest.mark.distributed
def test_one_and_two_processes_give_the_same_loss_trajectory(tiny, tmp_path, env):
    """The same global batch of 2 on 1 process and on 2 (torchrun, DDP on gloo): the logged
    losses agree to 1e-4 over 4 steps (float32; only the order of sums differs)."""
    trajectories = []
    for processes in (1, 2):
        output = tmp_path / f"p{processes}"
        subprocess.run([str(PYTHON_BIN / "torchrun"), "--nproc-per-node", str(processes), "-m", "raghub", "train",
                        *train_args(tiny, output, "--steps", "4", "--save-every", "4")],
                       env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=120)
        assert read_checkpoint(output).manifest["world_size"] == processes
        trajectories.append(losses(output))
    assert len(trajectories[0]) == 4
    assert trajectories[1] == pytest.approx(trajectories[0], abs=1e-4)
    assert trajectories[0][-1] != trajectories[0][0]  # it trained



def test_squad_train_and_heldout_split_the_articles_without_overlap(host):
    tasks = host.registry.tasks
    train, heldout = tasks["squad-train"]["articles"], tasks["squad-heldout"]["articles"]
    assert (train, heldout) == ({"first": 0, "last": 37}, {"first": 38, "last": 47})
    assert tasks["squad-train"]["data"] == tasks["squad-heldout"]["data"] == tasks["squad"]["data"]


def test_raghub_starts_with_the_train_command_and_without_torch():
    check = ("import sys, click, raghub.cli; cli = raghub.cli.cli; "
             "assert 'train' in cli.list_commands(click.Context(cli, obj=raghub.cli.PluginHost())); "
             "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
