"""The `dpr` dual-encoder retriever on tiny random encoders saved as users' folders: scores
against the two encoders' own outputs (DPR checkpoints and sentence-transformers pairs), the
cached FAISS index, the RAG-sequence loss against a hand-computed marginal, a short training
run that learns eight SQuAD answers, and `fid` + `dpr` end to end through `raghub run`."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Pooling, Transformer
from tokenizers import pre_tokenizers, processors
from transformers import BertConfig, BertModel, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from raghub import Passage, PromptTemplate, UsageError, answer_questions
from raghub.cache import Cache
from raghub.cli import cli
from raghub.metrics import best_over_aliases, exact_match
from raghub.plugin_manager import registry
from raghub.plugins.models.seq2seq import HuggingFaceSeq2Seq
from raghub.plugins.retrievers.dpr import DPRRetriever
from test_models import cache_dir  # noqa: F401 (a fixture)
from test_retrievers import CountingCache
from test_seq2seq import save_tiny_t5, word_tokenizer

PASSAGES = [Passage("0", "The tower is in Paris.", "Eiffel Tower"), Passage("1", "The Nile flows through Egypt."),
            Passage("2", "Ulm is a city on the Danube.", "Ulm"), Passage("3", "Paris is the capital of France.")]
QUERIES = ["Where is the tower?", "Which river flows through Egypt?"]
WORDS = sorted({word for text in [p.as_text() for p in PASSAGES] + QUERIES
                for word in text.replace("?", " ").replace(".", " ").split()})
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


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


def squad_examples(n: int):
    """The first `n` SQuAD dev questions (completion prompts, no few-shot) and a corpus of
    their paragraphs plus as many other ones."""
    found = registry()
    task = found.task_families["qa"]("squad", found.tasks["squad"], os.environ["RAGHUB_DATA_DIR"], found)
    questions = [replace(q, template=PromptTemplate(style="completion"), max_new_tokens=8)
                 for q in task.loaded.questions[:n]]
    gold = {i for q in questions for i in q.gold_passage_ids}
    others = [p for p in dict.fromkeys(task.loaded.passages) if p.id not in gold]
    corpus = [p for p in dict.fromkeys(task.loaded.passages) if p.id in gold] + others[: len(gold)]
    return questions, corpus


def rag_setup(tmp_path, questions, corpus, **t5_settings):
    """A tiny T5 and a tiny DPR dual encoder over the words of `questions` and `corpus`, with
    `corpus` indexed."""
    texts = [p.as_text() for p in corpus] + [q.prompt([]) for q in questions] + [a for q in questions for a in q.answers]
    words = sorted({word for text in texts for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    generator = HuggingFaceSeq2Seq().load(str(save_tiny_t5(tmp_path / "t5", words, **t5_settings)),
                                          "cpu", "float32", batch_size=16)
    question_folder, context_folder = save_tiny_dpr(tmp_path / "dpr", words)
    retriever = DPRRetriever(Cache(tmp_path / "cache"), encoder=str(question_folder),
                             passage_encoder=str(context_folder))
    retriever.index(corpus, "corpus")
    return generator, retriever


def test_the_rag_sequence_loss_is_the_hand_computed_marginal(tmp_path, cache_dir):
    questions, corpus = squad_examples(2)
    generator, retriever = rag_setup(tmp_path, questions, corpus, init_scale=1.0)
    answers = [q.answers[0] for q in questions]
    loss = retriever.rag_sequence_loss(generator, questions, answers, corpus, k=2)
    expected = []
    for q, answer, hits in zip(questions, answers, retriever.search([q.query for q in questions], 2)):
        passages = [corpus[position] for position, _ in hits]
        with torch.no_grad():
            scores = (retriever.question_encoder([q.query]) @ retriever.passage_encoder.passages(passages).T)[0]
        assert scores.tolist() == pytest.approx([score for _, score in hits], abs=1e-4)
        likelihoods = []
        for passage in passages:
            labels = generator.tokenizer([answer], return_tensors="pt")["input_ids"]  # answer </s>
            with torch.no_grad():
                logits = generator.hf_model(**generator.tokenizer([q.prompt([passage])], return_tensors="pt"),
                                            labels=labels).logits
            likelihoods.append(math.exp(logits[0].log_softmax(-1).gather(-1, labels[0, :, None]).sum()))
        weights = torch.softmax(scores.double(), 0).tolist()
        expected.append(-math.log(sum(w * p for w, p in zip(weights, likelihoods))))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_a_short_training_run_learns_eight_squad_answers_through_both_encoders(tmp_path, cache_dir, request):
    """The pieces `raghub train` will use: AdamW on the RAG-sequence loss over a tiny T5 and a
    tiny DPR dual encoder, 8 SQuAD questions; every part gets gradients and greedy answers
    with the top passage reach EM >= 0.75, in under two minutes on a CPU. One torch thread:
    on a CPU shared with other work, two threads of such small operations wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    questions, corpus = squad_examples(8)
    generator, retriever = rag_setup(tmp_path, questions, corpus, seed=0, init_scale=1.0)
    answers = [q.answers[0] for q in questions]
    parts = {"generator": generator.hf_model, "question encoder": retriever.question_encoder.model,
             "passage encoder": retriever.passage_encoder.model}
    optimizer = torch.optim.AdamW([p for part in parts.values() for p in part.parameters()], lr=1e-2)
    started = time.perf_counter()
    for step in range(300):
        optimizer.zero_grad()
        loss = retriever.rag_sequence_loss(generator, questions, answers, corpus, k=2)
        loss.backward()
        if step == 0:
            for name, part in parts.items():
                assert sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None) > 0, name
            first_loss = loss.item()
        optimizer.step()
        if step % 25 == 24 and exact_matches(generator, retriever, questions, corpus) >= 0.75 * len(questions):
            break
    elapsed = time.perf_counter() - started
    print(f"training: {step + 1} steps, {elapsed:.1f} s, loss {first_loss:.2f} -> {loss.item():.2f}")
    assert exact_matches(generator, retriever, questions, corpus) >= 0.75 * len(questions)
    assert elapsed < 120


def exact_matches(generator, retriever, questions, corpus) -> int:
    """How many questions the generator answers exactly, greedily, with the passage the current
    encoders score highest (the index still holds the passage embeddings from before training)."""
    with torch.no_grad():
        scores = retriever.scores([q.query for q in questions], [corpus] * len(questions))
    predictions = answer_questions(generator, questions, [[corpus[int(best)]] for best in scores.argmax(-1)])
    return sum(best_over_aliases(exact_match, p, q.answers) for p, q in zip(predictions, questions))


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
