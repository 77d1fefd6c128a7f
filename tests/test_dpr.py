"""The `dpr` dual-encoder retriever on tiny random encoders saved as users' folders: scores
against the two encoders' own outputs (DPR checkpoints and sentence-transformers pairs), the
cached FAISS index, `raghub train`'s RAG-sequence loss over DPR and T5 against a hand-computed
marginal, a `raghub train` run that learns eight SQuAD answers, and `fid` + `dpr` end to end
through `raghub run`."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Pooling, Transformer
from tokenizers import pre_tokenizers, processors
from transformers import BertConfig, BertModel, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from raghub import Passage, UsageError
from raghub.cache import Cache
from raghub.checkpoints import GENERATOR, PASSAGE_ENCODER, QUERY_ENCODER, TRAIN_LOG, read_checkpoint
from raghub.cli import cli
from raghub.plugins.retrievers.dpr import DPRRetriever
from raghub.plugins.training.rag.trainer import TrainConfig, Trainer
from raghub.settings import read_task_definition
from raghub.plugin_manager import PluginHost
from test_models import cache_dir  # noqa: F401 (a fixture)
from test_retrievers import CountingCache
from test_seq2seq import save_tiny_t5, word_tokenizer

PASSAGES = [Passage("0", "The tower is in Paris.", "Eiffel Tower"), Passage("1", "The Nile flows through Egypt."),
            Passage("2", "Ulm is a city on the Danube.", "Ulm"), Passage("3", "Paris is the capital of France.")]
QUERIES = ["Where is the tower?", "Which river flows through Egypt?"]
WORDS = sorted({word for text in [p.as_text() for p in PASSAGES] + QUERIES
                for word in text.replace("?", " ").replace(".", " ").split()})
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
SQUAD_FILE = "dev-v1.1.rebuilt-from-explorer-html.json"


def bert_tokenizer(words):
    """A word-level tokenizer that frames text as BERT does: [CLS] a [SEP] (b [SEP])."""
    framing = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return word_tokenizer(words, BERT_SPECIALS, framing, cls_token="[CLS]", sep_token="[SEP]")


def tiny_bert_settings(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)


def save_tiny_dpr(folder: Path, words=WORDS, seed: int = 0) -> tuple[Path, Path]:
    """A random 2-layer DPR question encoder and context encoder, each saved as a folder with
    its tokenizer; returns (question folder, context folder)."""
    tokenizer = bert_tokenizer(words)
    config = DPRConfig(**tiny_bert_settings(len(tokenizer)))
    made = []
    for offset, (name, cls) in enumerate((("question", DPRQuestionEncoder), ("context", DPRContextEncoder))):
        torch.manual_seed(seed + offset)
        cls(config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        made.append(folder / name)
    return made[0], made[1]


def save_tiny_sentence_transformer(folder: Path, seed: int) -> Path:
    """A random 2-layer BERT with mean pooling, saved as a sentence-transformers folder."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(WORDS)
    BertModel(BertConfig(**tiny_bert_settings(len(tokenizer)))).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    transformer = Transformer(str(folder / "bert"), max_seq_length=64)
    SentenceTransformer(modules=[transformer, Pooling(32, "mean")], device="cpu").save(str(folder / "st"))
    return folder / "st"


@pytest.fixture
def dpr_folders(tmp_path):
    return save_tiny_dpr(tmp_path / "dpr")


def ranked(scores: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Each row's top-k (position, score), best first."""
    return [sorted(enumerate(row.tolist()), key=lambda pair: -pair[1])[:k] for row in scores]


def assert_same_ranking(found, expected):
    for found_row, expected_row in zip(found, expected):
        assert [p for p, _ in found_row] == [p for p, _ in expected_row]
        assert [s for _, s in found_row] == pytest.approx([s for _, s in expected_row], abs=1e-4)


def test_dpr_scores_are_inner_products_of_the_question_and_context_encoders(dpr_folders, tmp_path):
    question_folder, context_folder = dpr_folders
    retriever = DPRRetriever(Cache(tmp_path / "cache"), encoder=str(question_folder),
                             passage_encoder=str(context_folder))
    retriever.index(PASSAGES, "toy")
    tokenizer = bert_tokenizer(WORDS)
    with torch.no_grad():
        questions = DPRQuestionEncoder.from_pretrained(question_folder)(
            **tokenizer(QUERIES, padding=True, return_tensors="pt")).pooler_output
        passages = DPRContextEncoder.from_pretrained(context_folder)(
            **tokenizer([p.title for p in PASSAGES], [p.text for p in PASSAGES], padding=True,
                        return_tensors="pt")).pooler_output
    assert_same_ranking(retriever.search(QUERIES, 3), ranked((questions @ passages.T).numpy(), 3))
    first_cls = DPRQuestionEncoder.from_pretrained(question_folder).question_encoder.bert_model(
        **tokenizer(QUERIES[:1], return_tensors="pt")).last_hidden_state[0, 0]
    assert torch.allclose(questions[0], first_cls, atol=1e-5)  # DPR pools the [CLS] vector


def test_a_sentence_transformers_pair_uses_its_own_pooling(tmp_path):
    question_model = save_tiny_sentence_transformer(tmp_path / "q", seed=0)
    passage_model = save_tiny_sentence_transformer(tmp_path / "p", seed=1)
    retriever = DPRRetriever(Cache(tmp_path / "cache"), encoder=str(question_model),
                             passage_encoder=str(passage_model), encode_batch_size=3)
    retriever.index(PASSAGES, "toy")
    questions = SentenceTransformer(str(question_model), device="cpu").encode(QUERIES)
    passages = SentenceTransformer(str(passage_model), device="cpu").encode([p.as_text() for p in PASSAGES])
    assert_same_ranking(retriever.search(QUERIES, 4), ranked(questions @ passages.T, 4))


def test_the_faiss_index_is_cached_and_reused(dpr_folders, tmp_path):
    question_folder, context_folder = dpr_folders
    cache = CountingCache(tmp_path / "cache")
    settings = {"encoder": str(question_folder), "passage_encoder": str(context_folder)}
    first = DPRRetriever(cache, **settings)
    first.index(PASSAGES, "toy")
    second = DPRRetriever(cache, **settings)
    second.index(PASSAGES, "toy")
    assert cache.builds == {"dpr-embeddings": 1, "dpr-index": 1}
    assert "passage_encoder" not in second.__dict__  # the second run never loaded the passage encoder
    assert second.search(QUERIES, 2) == first.search(QUERIES, 2)
    DPRRetriever(cache, **settings, index_type="hnsw").index(PASSAGES, "toy")
    assert cache.builds == {"dpr-embeddings": 1, "dpr-index": 2}  # same embeddings, another index


def test_an_encoder_that_cannot_be_found_is_one_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    retriever = DPRRetriever(Cache(tmp_path), passage_encoder=str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="dpr: encoder '.*missing' cannot be loaded") as refused:
        retriever.index(PASSAGES, "toy")
    assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def squad_article(tmp_path_factory):
    """SQuAD dev's first article as a data folder, a task over its first 8 questions (its 54
    paragraphs are the corpus), a tiny random T5 and a tiny random DPR pair whose word-level
    vocabularies cover the task's words."""
    root = tmp_path_factory.mktemp("article")
    source = json.loads((Path(os.environ["RAGHUB_DATA_DIR"]) / "squad" / SQUAD_FILE).read_text())
    (root / "data" / "squad").mkdir(parents=True)
    (root / "data" / "squad" / "article.json").write_text(json.dumps({"data": source["data"][:1]}))
    task = root / "squad-eight.yaml"
    task.write_text("name: squad-eight\nfamily: qa\nprompt: completion\nmax_new_tokens: 8\n"
                    "data: {folder: squad, file: article.json, format: squad}\nsample: {first: 8}\n")
    found = PluginHost().registry
    loaded = found.task_families["qa"]("squad-eight", read_task_definition(task), str(root / "data"), found).loaded
    texts = [p.as_text() for p in loaded.passages] + [q.prompt(loaded.passages[:1]) for q in loaded.questions]
    texts += [a for q in loaded.questions for a in q.answers]
    words = sorted({word for text in texts for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    question_folder, context_folder = save_tiny_dpr(root / "dpr", words)
    return {"task": task, "data": root / "data", "t5": save_tiny_t5(root / "t5", words, seed=0, init_scale=1.0),
            "question": question_folder, "context": context_folder}


def train_config(article, output, **settings) -> TrainConfig:
    return TrainConfig(task=str(article["task"]), output=str(output), objective="rag-sequence",
                       objective_args="temperature=1", retriever="dpr", encoder=str(article["question"]),
                       passage_encoder=str(article["context"]), model=str(article["t5"]), n_docs=2,
                       data_dir=str(article["data"]), lora_rank=0, **settings)


def test_the_trainers_rag_sequence_loss_over_dpr_and_t5_is_the_hand_computed_marginal(host, squad_article, tmp_path,
                                                                                      cache_dir):
    """−mean ln Σ_k softmax(q·p)_k p_T5(answer </s> | prompt with passage k), over the top 2
    passages of each question by the DPR towers, computed by hand from the models."""
    trainer = Trainer(train_config(squad_article, tmp_path / "out", batch_size=2), host.registry)
    questions = trainer.batch(1)
    loss, _ = trainer.model(questions, "joint")
    retriever, generator = trainer.retriever, trainer.lm
    retriever.index(trainer.model.passages, "article")
    expected = []
    for question, hits in zip(questions, retriever.search([q.query for q in questions], 2)):
        passages = [trainer.model.passages[position] for position, _ in hits]
        with torch.no_grad():
            scores = (retriever.question_encoder([question.query]) @ retriever.passage_encoder.passages(passages).T)[0]
        assert scores.tolist() == pytest.approx([score for _, score in hits], abs=1e-4)
        likelihoods = []
        for passage in passages:
            labels = generator.tokenizer([question.answers[0]], return_tensors="pt")["input_ids"]  # answer </s>
            with torch.no_grad():
                logits = generator.hf_model(**generator.tokenizer([question.prompt([passage])], return_tensors="pt"),
                                            labels=labels).logits
            likelihoods.append(math.exp(logits[0].log_softmax(-1).gather(-1, labels[0, :, None]).sum()))
        weights = torch.softmax(scores.double(), 0).tolist()
        expected.append(-math.log(sum(w * p for w, p in zip(weights, likelihoods))))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_the_gradient_reaches_both_dpr_towers_and_the_t5_generator(host, squad_article, tmp_path, cache_dir):
    trainer = Trainer(train_config(squad_article, tmp_path / "out", batch_size=2, train_passages=True), host.registry)
    trainer.model(trainer.batch(1), "joint")[0].backward()
    for name in ("query_encoder", "passage_encoder", "generator"):
        module = getattr(trainer.model, name)
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0, name


def run_eight(squad_article, results, *extra, method="rag-sequence") -> dict:
    """`raghub run` of `method` with the tiny T5 and DPR pair on the 8 questions: the record."""
    result = CliRunner().invoke(cli, [
        "run", "--task", str(squad_article["task"]), "--data-dir", str(squad_article["data"]), "--method",
        method, "--model", str(squad_article["t5"]), "--retriever", "dpr", "--encoder",
        str(squad_article["question"]), "--passage-encoder", str(squad_article["context"]), "--n-docs", "1",
        "--results-dir", str(results), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_raghub_train_learns_eight_squad_answers_with_dpr_and_t5(squad_article, tmp_path, cache_dir, request):
    """The DPR + T5 recipe end to end: `raghub train` with warm-up, gradient accumulation and
    bf16 mixed precision trains the T5 and both DPR towers on 8 SQuAD questions, in under two
    minutes on a CPU; `raghub run --checkpoint` then answers at least 6 of the 8 exactly, with
    `rag-sequence` and with `fid` (the untrained pair: none). One torch thread: on a shared CPU, two threads of such small
    operations wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    output = tmp_path / "trained"
    started = time.perf_counter()
    result = CliRunner().invoke(cli, [
        "train", "--task", str(squad_article["task"]), "--data-dir", str(squad_article["data"]), "--output",
        str(output), "--objective", "rag-sequence", "--objective-args", "temperature=1", "--retriever", "dpr",
        "--encoder", str(squad_article["question"]), "--passage-encoder", str(squad_article["context"]),
        "--train-passages", "--model", str(squad_article["t5"]), "--lora-rank", "0", "--n-docs", "2",
        "--batch-size", "4", "--grad-accum", "2", "--steps", "80", "--save-every", "80", "--lr", "1e-2",
        "--retriever-learning-rate", "1e-3", "--warmup-steps", "5", "--mixed-precision", "bf16"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    checkpoint = read_checkpoint(output)
    assert {part: bool(checkpoint.part(part)) for part in (GENERATOR, QUERY_ENCODER, PASSAGE_ENCODER)} == dict.fromkeys(
        (GENERATOR, QUERY_ENCODER, PASSAGE_ENCODER), True)
    log = [json.loads(line) for line in (output / TRAIN_LOG).read_text().splitlines()]
    print(f"raghub train: {len(log)} steps, {elapsed:.1f} s, loss {log[0]['loss']:.2f} -> {log[-1]['loss']:.2f}")
    assert elapsed < 120
    untrained = run_eight(squad_article, tmp_path / "results")
    trained = run_eight(squad_article, tmp_path / "results", "--checkpoint", str(output))
    print(f"EM on the 8 training questions: untrained {untrained['metrics']['em']}, trained {trained['metrics']['em']}")
    fused = run_eight(squad_article, tmp_path / "results", "--checkpoint", str(output), method="fid")
    assert untrained["metrics"]["em"] == 0
    assert trained["metrics"]["em"] >= 0.75 and fused["metrics"]["em"] >= 0.75
    for record in (trained, fused):
        assert record["config"]["retriever"]["checkpoint"] == checkpoint.identity
        assert record["method_stats"]["checkpoint"] == checkpoint.identity


def test_fid_with_dpr_runs_squad_end_to_end(dpr_folders, tmp_path, cache_dir):
    t5_folder = save_tiny_t5(tmp_path / "t5")
    question_folder, context_folder = dpr_folders
    results = tmp_path / "results"
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", "fid", "--model", str(t5_folder),
                                      "--retriever", "dpr", "--encoder", str(question_folder),
                                      "--passage-encoder", str(context_folder), "--limit", "5", "--json",
                                      "--results-dir", str(results)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["method"], record["retriever"], record["n_examples"]) == ("fid", "dpr", 5)
    assert record["config"]["retriever"]["passage_encoder"] == str(context_folder)
    assert "recall@4" in record["metrics"]
    stored = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert stored[-1]["config"] == record["config"]


def test_a_checkpoint_trained_for_another_retriever_or_encoder_is_refused(dpr_folders, tmp_path):
    question_folder, context_folder = dpr_folders
    settings = {"encoder": str(question_folder), "passage_encoder": str(context_folder)}
    for retriever, trained_from in (("dense", {"encoder": str(question_folder)}),
                                    ("dpr", {**settings, "passage_encoder": "another"})):
        folder = tmp_path / f"trained-{retriever}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"step": 1, "fingerprint": "f", "retriever": retriever,
                                                           "retriever_settings": trained_from}))
        with pytest.raises(UsageError, match="was trained for retriever"):
            DPRRetriever(Cache(tmp_path / "cache"), **settings, checkpoint=str(folder)).index(PASSAGES, "toy")
