"""The stages between retrieval and reading: reciprocal rank fusion of a `+`-joined retriever,
the rerankers (lm / UPR, embedding, cross-encoder) and the refiners (truncate, extractive), each
checked on a toy, then run through `raghub run` on the scripted two-question task: what the
record and the samples log show, what bad stage settings are told, and that a second identical
run asks no stage anything again."""

from __future__ import annotations

import re
from types import SimpleNamespace
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raghub import Method, Passage, Refiner, Reranker, Retriever, hookimpl, reciprocal_rank_fusion
from raghub.cli import cli
from raghub.plugins.refiners.extractive import ExtractiveRefiner
from raghub.plugins.refiners.truncate import TruncateRefiner
from raghub.plugins.rerankers.cross_encoder import CrossEncoderReranker
from raghub.plugins.rerankers.embedding import EmbeddingReranker
from raghub.plugins.rerankers.lm import LMReranker
from raghub.plugins.retrievers.dense import DenseRetriever
from raghub.plugins.retrievers.dpr import DPRRetriever
from scripted import BRIDGE, PASSAGES, Overlap, PieceTokenizer, ScriptedBackend, ScriptedModel, scripted  # noqa: F401

# --- reciprocal rank fusion -------------------------------------------------------------------


def test_fusion_sums_reciprocal_ranks():
    fused = reciprocal_rank_fusion([[(1, 0.9), (2, 0.5), (3, 0.1)], [(3, 7.0), (1, 4.0)]], k=60)
    assert [p for p, _ in fused] == [1, 3, 2]
    assert [s for _, s in fused] == pytest.approx([1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62])


def test_fusion_breaks_ties_by_first_appearance():
    """Equal fused scores keep the order in which the positions were first met."""
    fused = reciprocal_rank_fusion([[(1, 0.0), (2, 0.0)], [(2, 0.0), (1, 0.0)]], k=1)
    assert fused == [(1, pytest.approx(1 / 2 + 1 / 3)), (2, pytest.approx(1 / 3 + 1 / 2))]


def test_fusion_of_disjoint_lists_interleaves_them():
    fused = reciprocal_rank_fusion([[(1, 0.0), (2, 0.0)], [(3, 0.0), (4, 0.0)]], k=60)
    assert fused == [(1, 1 / 61), (3, 1 / 61), (2, 1 / 62), (4, 1 / 62)]


def test_fusion_with_one_side_empty_keeps_the_other_order():
    assert reciprocal_rank_fusion([[(5, 3.0), (7, 1.0)], []], k=10) == [(5, 1 / 11), (7, 1 / 12)]
    assert reciprocal_rank_fusion([[], []]) == []


# --- the rerankers on a four-passage toy --------------------------------------------------------

TOY = [Passage("a", "Alpha Film is a 1990 drama.", "Alpha Film"), Passage("b", "Bea Mann is a director.", "Bea Mann"),
       Passage("u", "Ulm is a city on the Danube.", "Ulm"), Passage("e", "Albert Einstein was born in Ulm.", "Einstein")]
#: the log-probs of the question's tokens after each passage's prompt; their means (UPR's
#: scores): Alpha Film -2.0, Bea Mann -1.0, Ulm -3.5, Einstein -0.5 (its sum, -2.0, ties Alpha's)
UPR_LOGPROBS = {"Alpha Film": [-1.0, -3.0], "Bea Mann": [-1.0, -1.0, -1.0], "Ulm": [-3.0, -4.0],
                "Einstein": [-0.25, -0.25, -0.5, -1.0], "Gamma River": [-5.0], "Delta River": [-6.0]}


class UprModel(ScriptedModel):
    """Scores a continuation by the passage its prompt holds (`UPR_LOGPROBS`); counts its calls."""

    def __init__(self):
        super().__init__(lambda prompt: " Ulm\n")
        self.scored: list[list[tuple[str, str]]] = []

    def continuation_logprobs(self, prompts, continuations):
        self.scored.append(list(zip(prompts, continuations)))
        return [torch.tensor(UPR_LOGPROBS[re.search(r"Passage: (.+)", p).group(1)]) for p in prompts]


def test_upr_scores_each_passage_by_its_mean_question_logprob_in_one_batch():
    model = UprModel()
    scores = LMReranker(model, None).score(["Where was Einstein born?"], [TOY])
    assert scores == [[-2.0, -1.0, -3.5, -0.5]]
    (batch,) = model.scored  # all four pairs in one call
    assert [c for _, c in batch] == [" Where was Einstein born?"] * 4
    assert batch[3][0] == ("Passage: Einstein\nAlbert Einstein was born in Ulm.\n"
                           "Please write a question based on this passage.\nQuestion:")
    assert LMReranker(model, None).fingerprint() == {"name": "lm", "model": "scripted-weights", "dtype": "float32"}


def test_embedding_reranker_prefers_the_passage_that_answers():
    scores = EmbeddingReranker(None, None).score(["Where was Albert Einstein born?", "Which film did Bea Mann direct?"],
                                                 [TOY, TOY])
    assert np.argmax(scores[0]) == 3 and np.argmax(scores[1]) in (0, 1)
    assert all(-1.0 <= s <= 1.0 for own in scores for s in own)


def save_tiny_cross_encoder(folder, seed=0):
    """A random two-layer BERT with a one-label head and its word-piece vocabulary, saved as a
    user's cross-encoder folder would be."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for p in TOY for w in re.findall(r"\w+", p.as_text().lower())} | {"where", "was", "born"})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    return save_tiny_cross_encoder(tmp_path_factory.mktemp("cross-encoder"))


def test_cross_encoder_reranker_scores_pairs_with_the_folder_model(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    reranker = CrossEncoderReranker(None, None, reranker_model=str(tiny_cross_encoder))
    scores = reranker.score(["where was einstein born"], [TOY])
    expected = CrossEncoder(str(tiny_cross_encoder)).predict([("where was einstein born", p.as_text()) for p in TOY])
    assert scores[0] == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(set(scores[0])) == 4  # a random head still tells the passages apart
    assert reranker.fingerprint()["reranker_model_content"]  # the folder's content keys its cached scores


# --- the refiners -------------------------------------------------------------------------------


def test_truncate_keeps_the_first_tokens_of_each_passage():
    model = ScriptedModel(lambda prompt: "")  # a token: a word with the spaces before it
    refiner = TruncateRefiner(model, None, refine_tokens=3)
    assert refiner.refine(["q"], [TOY[:2]]) == [["Alpha Film is", "Bea Mann is"]]
    assert TruncateRefiner(model, None, refine_tokens=30).refine(["q"], [TOY[:1]]) == [[TOY[0].text]]


def test_extractive_keeps_the_most_similar_sentences_that_fit_in_document_order(monkeypatch):
    """Similarity by hand-made embeddings: the query is [1, 0]; a sentence's similarity is the
    first number after its 's'."""
    def embed(self, texts):
        return np.array([[1.0, 0.0] if t == "q" else [float(re.search(r"s(\d)", t).group(1)) / 10, 0.0] for t in texts])

    monkeypatch.setattr(ExtractiveRefiner, "embed", embed)
    passages = [Passage("1", "s1 a b. s9 c d e. s2 f."), Passage("2", "s8 g. s7 h i j k l."), Passage("3", "s3 m.")]
    refiner = ExtractiveRefiner(ScriptedModel(lambda prompt: ""), None, refine_tokens=8)
    # by similarity: s9 (4 tokens), s8 (2), s7 (6: does not fit in the 2 left), s3 (2): 8 tokens
    assert refiner.refine(["q"], [passages]) == [["s9 c d e.", "s8 g.", "s3 m."]]
    assert ExtractiveRefiner(ScriptedModel(lambda p: ""), None, refine_tokens=5).refine(["q"], [passages]) == \
        [["s9 c d e.", "", ""]]
    # the first of a passage's kept sentences stays first, though the later one is more similar
    two = [Passage("1", "s2 x. s5 y. s9 z.")]
    assert ExtractiveRefiner(ScriptedModel(lambda p: ""), None, refine_tokens=4).refine(["q"], [two]) == [["s5 y. s9 z."]]


# --- the stages in a run ------------------------------------------------------------------------


class Backwards(Retriever):
    """Ranks the passages in reverse corpus order, scored by their position; counts its searches."""

    name = "backwards"
    searched = 0

    def index(self, passages, corpus_fingerprint):
        self.size = len(passages)

    def search(self, queries, k):
        Backwards.searched += len(queries)
        return [[(p, float(p)) for p in reversed(range(self.size))][:k] for _ in queries]


@pytest.fixture
def staged(scripted, add_plugin):
    """The scripted runs with the `backwards` retriever too, and UPR's scripted model."""
    add_plugin(SimpleNamespace(register_retrievers=hookimpl(lambda register: register(Backwards))))
    Backwards.searched = 0
    ScriptedBackend.model = UprModel()
    return scripted


def titles(hits):
    return [hit["title"] for hit in hits]


def test_a_hybrid_run_fuses_both_rankings_and_names_the_combination(staged):
    record, (bridge, _) = staged.run("incontext", "--retriever", "overlap+backwards", "--n-docs", 2)
    # overlap ranks BRIDGE's passages Alpha Film, Bea Mann, Einstein, Ulm, Gamma, Delta; backwards
    # Einstein, Delta, Gamma, Ulm, Bea Mann, Alpha Film (each fetches 4 x 2, cut to the 6 there are)
    assert titles(bridge["retrieved"]) == ["Einstein", "Alpha Film"]
    assert [hit["score"] for hit in bridge["retrieved"]] == pytest.approx([1 / 63 + 1 / 61, 1 / 61 + 1 / 66])
    assert record["retriever"] == "overlap+backwards"
    assert record["config"]["stages"] == {"retrievers": ["overlap", "backwards"], "fusion_k": 60,
                                          "rerank_depth": "4 x k", "reranker": None, "refiner": None}
    assert len(record["config"]["code"]["retriever"]) == 2 and record["plugins"]["retriever"].count(" + ") == 1
    assert record["settings"] == ""  # the defaults: the retriever's name says it all


def test_a_reranked_run_keeps_the_best_and_logs_what_it_moved(staged):
    record, (bridge, comparison) = staged.run("incontext", "--reranker", "lm", "--rerank-depth", 4, "--n-docs", 2)
    # overlap's top 4 for BRIDGE: Alpha Film 2, Bea Mann 2, Einstein 1, Ulm 0; UPR's means put
    # Einstein (-0.5) before Bea Mann (-1.0)
    assert [{k: hit[k] for k in ("title", "rank", "score", "first_rank", "first_score")} for hit in bridge["retrieved"]] \
        == [{"title": "Einstein", "rank": 1, "score": -0.5, "first_rank": 3, "first_score": 1.0},
            {"title": "Bea Mann", "rank": 2, "score": -1.0, "first_rank": 2, "first_score": 2.0}]
    assert sum(map(len, ScriptedBackend.model.scored)) == 8  # 4 candidates of each of 2 questions
    shown = CliRunner().invoke(cli, ["samples", record["id"], "--results-dir", str(staged.folder / "results")],
                               env={"COLUMNS": "200"})
    assert "1. Einstein (-0.50) was 3 (1.00)" in shown.output
    assert record["config"]["stages"]["reranker"] == {"name": "lm"} and record["config"]["stages"]["rerank_depth"] == 4
    assert "reranker=lm" in record["settings"] and "rerank_depth=4" in record["settings"]
    assert record["plugins"]["reranker"] == "built-in" and "reranker" in record["config"]["code"]


def test_a_refined_run_reports_the_tokens_kept(staged):
    record, lines = staged.run("incontext", "--refiner", "truncate", "--refine-tokens", 3, "--n-docs", 2)
    bridge = lines[0]
    assert [(hit["tokens_kept"], hit["tokens_retrieved"]) for hit in bridge["retrieved"]] == [(3, 10), (3, 9)]
    prompt = next(p for p in ScriptedBackend.model.prompts if BRIDGE in p)
    assert "Alpha Film\nAlpha Film is\n" in prompt and PASSAGES["Alpha Film"] not in prompt  # the method read the cut text
    kept = sum(h["tokens_kept"] for line in lines for h in line["retrieved"])
    retrieved = sum(h["tokens_retrieved"] for line in lines for h in line["retrieved"])
    assert record["method_stats"]["refiner_tokens_kept_share"] == pytest.approx(kept / retrieved)
    assert record["method_stats"]["refiner_tokens_kept_per_example"] == kept / 2
    assert record["config"]["stages"]["refiner"] == {"name": "truncate", "refine_tokens": 3}


class DropsTheComparison(Refiner):
    """Keeps every passage of the bridge question and none of the comparison question's."""

    name = "drops-the-comparison"

    def refine(self, queries, passages):
        return [["" if "longer" in query else p.text for p in own] for query, own in zip(queries, passages)]


def test_a_question_whose_passages_a_refiner_all_dropped_counts_in_recall(staged, add_plugin):
    """Regression: a question left no passage had no recall@k, so the record's recall and its
    standard error were over the other questions only, as if it had found its gold passages."""
    add_plugin(SimpleNamespace(register_refiners=hookimpl(lambda register: register(DropsTheComparison))))
    record, (bridge, comparison) = staged.run("incontext", "--refiner", "drops-the-comparison", "--n-docs", 2)
    assert comparison["retrieved"] == [] and comparison["recall@2"] == 0.0
    assert record["metrics"]["recall@2"] == pytest.approx((bridge["recall@2"] + 0.0) / 2)
    assert record["stderr"]["recall@2"] is not None


def test_the_tokens_of_passages_a_refiner_dropped_count_as_retrieved_and_not_kept(staged, add_plugin):
    """Regression: a passage the refiner emptied left the run's counts, so the comparison's two
    passages, retrieved and dropped whole, made the share kept 1.0."""
    add_plugin(SimpleNamespace(register_refiners=hookimpl(lambda register: register(DropsTheComparison))))
    record, (bridge, comparison) = staged.run("incontext", "--refiner", "drops-the-comparison", "--n-docs", 2)
    dropped = sum(len(ScriptedBackend.model.encode(PASSAGES[title])) for title in ("Gamma River", "Delta River"))
    assert comparison["retrieved"] == [] and comparison["refiner_dropped_tokens"] == dropped
    kept = sum(hit["tokens_kept"] for hit in bridge["retrieved"])
    retrieved = sum(hit["tokens_retrieved"] for hit in bridge["retrieved"]) + dropped
    assert record["method_stats"]["refiner_tokens_kept_share"] == pytest.approx(kept / retrieved)
    assert record["method_stats"]["refiner_tokens_retrieved_per_example"] == retrieved / 2


def test_a_second_identical_run_asks_no_stage_again(staged, monkeypatch):
    refined = []
    original = TruncateRefiner.refine
    monkeypatch.setattr(TruncateRefiner, "refine", lambda self, q, p: refined.append(q) or original(self, q, p))
    stages = ("--retriever", "overlap+backwards", "--reranker", "lm", "--refiner", "truncate", "--n-docs", 2)
    first, _ = staged.run("incontext", *stages)
    asked = (len(Overlap.asked), Backwards.searched, len(ScriptedBackend.model.scored), len(refined))
    assert all(asked)
    second, _ = staged.run("incontext", *stages, results="elsewhere")  # not the stored run: its caches
    assert (len(Overlap.asked), Backwards.searched, len(ScriptedBackend.model.scored), len(refined)) == asked
    assert second["metrics"] == first["metrics"] and second["id"] != first["id"]


def test_a_cross_encoder_folder_reranks_a_run_and_a_missing_one_is_one_line(staged, tiny_cross_encoder, tmp_path):
    record, (bridge, _) = staged.run("incontext", "--reranker", "cross-encoder", "--reranker-model",
                                     tiny_cross_encoder, "--n-docs", 2)
    scores = [hit["score"] for hit in bridge["retrieved"]]
    assert scores == sorted(scores, reverse=True) and all("first_rank" in hit for hit in bridge["retrieved"])
    assert record["config"]["stages"]["reranker"] == {"name": "cross-encoder", "reranker_model": str(tiny_cross_encoder),
                                                      "reranker_model_content": ANY}
    out = staged.invoke("incontext", "--reranker", "cross-encoder", "--reranker-model", tmp_path / "nowhere")
    assert out.exit_code == 2 and "cross-encoder: --reranker-model" in out.output and "cannot be loaded" in out.output


class AsksItself(Method):
    """Asks for its passages itself (no first stage) and answers from the first one's title."""

    name = "asks-itself"
    first_stage = False

    def answer(self, questions, retrieved):
        hits = self.retrieve(questions, [q.question for q in questions], self.n_docs)
        return [found[0].passage.title if found else "" for found in hits]


def test_a_method_s_own_retrieve_calls_go_through_the_stages(staged):
    staged.register(AsksItself)
    _, (bridge, _) = staged.run("asks-itself", "--reranker", "lm", "--refiner", "truncate", "--refine-tokens", 2,
                                "--n-docs", 1)
    (call,) = bridge["retrievals"]
    assert bridge["retrieved"] == [] and titles(call["hits"]) == ["Einstein"]  # UPR's best of overlap's 4
    assert {k: call["hits"][0][k] for k in ("first_rank", "tokens_kept")} == {"first_rank": 3, "tokens_kept": 2}


@pytest.mark.parametrize("args, message", [
    (("--reranker", "lmm"), "unknown reranker 'lmm'; did you mean lm?"),
    (("--refiner", "extract"), "unknown refiner 'extract'; did you mean extractive"),
    (("--retriever", "overlap+bm26"), "unknown retriever 'bm26'"),
    (("--retriever", "overlap+overlap"), "--retriever overlap+overlap names a retriever twice"),
    (("--rerank-depth", 8), "--rerank-depth needs --reranker or a hybrid --retriever"),
    (("--fusion-k", 10, "--reranker", "lm"), "--fusion-k needs a hybrid --retriever"),
    (("--reranker", "lm", "--rerank-depth", 1), "--rerank-depth 1 is less than --n-docs 2"),
    (("--reranker", "lm", "--rerank-depth", 0), "--rerank-depth must be at least 1, not 0"),
    (("--refiner", "truncate", "--refine-tokens", 0), "--refine-tokens must be at least 1, not 0"),
    (("--reranker-model", "x"), "--reranker-model is not an option of the selected"),
])
def test_bad_stage_settings_are_told_before_the_model_loads(staged, args, message):
    out = staged.invoke("incontext", "--n-docs", 2, *args)
    assert out.exit_code == 2 and message in out.output, out.output
    assert ScriptedBackend.loads == 0


class OneScore(Reranker):
    """Returns one score per query, whatever the candidates."""

    name = "one-score"

    def score(self, queries, candidates):
        return [[1.0] for _ in queries]


class NoTexts(Refiner):
    """Returns a number where each passage's text belongs."""

    name = "no-texts"

    def refine(self, queries, passages):
        return [[0 for _ in own] for own in passages]


@pytest.mark.parametrize("args, message", [
    (("--reranker", "one-score"), "reranker 'one-score' (registered at run time) returned [[1.0], [1.0]]; it must "
                                  "return one list of numbers per query, one per candidate (candidates per query: [6, 6])"),
    (("--refiner", "no-texts"), "refiner 'no-texts' (registered at run time) returned [[0, 0], [0, 0]]; it must "
                                "return one list of strings per query, one per passage (passages per query: [2, 2])"),
])
def test_a_stage_that_returns_the_wrong_shape_stops_the_run_in_one_line(staged, add_plugin, args, message):
    add_plugin(SimpleNamespace(register_rerankers=hookimpl(lambda register: register(OneScore)),
                               register_refiners=hookimpl(lambda register: register(NoTexts))))
    out = staged.invoke("incontext", "--n-docs", 2, *args)
    assert out.exit_code == 1 and out.output.strip() == f"Error: {message}", out.output


# --- what names a stage's model, and its cache keys ---------------------------------------------


def test_new_cross_encoder_weights_at_the_same_path_are_a_new_run(staged, tmp_path):
    """Regression: the stored run and the cached scores were recognised by the folder's path
    alone, so a cross-encoder saved again at the same path was served the old model's results."""
    folder = save_tiny_cross_encoder(tmp_path / "reranker", seed=0)
    stages = ("--reranker", "cross-encoder", "--reranker-model", folder, "--n-docs", 2)
    first, (bridge, _) = staged.run("incontext", *stages)
    assert staged.run("incontext", *stages)[0]["id"] == first["id"]  # unchanged: the stored run
    save_tiny_cross_encoder(folder, seed=1)  # other weights behind the same path
    second, (retrained, _) = staged.run("incontext", *stages)
    assert second["id"] != first["id"]
    assert [hit["score"] for hit in retrained["retrieved"]] != [hit["score"] for hit in bridge["retrieved"]]


def sentence_folder(folder, weights: bytes):
    """A folder that looks like a sentence-transformers model's (only its files are read)."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


@pytest.mark.parametrize("identify", [
    lambda path: EmbeddingReranker.identity(EmbeddingReranker.resolve_options({"encoder": path})),
    lambda path: ExtractiveRefiner.identity(ExtractiveRefiner.resolve_options({"encoder": path})),
    lambda path: DenseRetriever(None, encoder=path).fingerprint(),
    lambda path: DenseRetriever(None, encoder=path).embedding_key(),
    lambda path: DPRRetriever(None, passage_encoder=path).embedding_key(),
], ids=["embedding reranker", "extractive refiner", "dense retriever", "dense embeddings", "dpr embeddings"])
def test_an_encoder_folder_is_named_by_its_content(identify, tmp_path):
    """Regression: `--encoder` (and dpr's `--passage-encoder`) named a folder by its path only,
    in the record's config (which recognises a stored run) and in the cache keys."""
    path = sentence_folder(tmp_path / "encoder", b"old weights")
    before = identify(path)
    assert identify(path) == before
    sentence_folder(tmp_path / "encoder", b"other, longer weights")  # new size: a tick may keep the mtime
    assert identify(path) != before


@pytest.mark.parametrize("identify", [
    lambda path: EmbeddingReranker.identity(EmbeddingReranker.resolve_options({"encoder": path})),
    lambda path: ExtractiveRefiner.identity(ExtractiveRefiner.resolve_options({"encoder": path})),
])
def test_an_encoder_folder_s_module_configs_in_subfolders_are_part_of_its_content(identify, tmp_path):
    """Regression: only the folder's top-level files were hashed, so another pooling
    (sentence-transformers' `1_Pooling/config.json`: mean or CLS) at the same path kept the old
    cache entries and stored runs."""
    path = sentence_folder(tmp_path / "encoder", b"weights")
    (tmp_path / "encoder" / "1_Pooling").mkdir()
    (tmp_path / "encoder" / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    before = identify(path)
    (tmp_path / "encoder" / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert identify(path) != before


class LetterTokenizer(PieceTokenizer):
    """Each character a token."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.id(letter) for letter in text]}


def test_a_refiner_s_cache_is_keyed_by_the_model_whose_tokens_it_counts(staged):
    """Regression: truncate's cached cuts were keyed by its options only, so a run with another
    model (another tokenizer) read the first model's cuts and token counts."""
    stages = ("--refiner", "truncate", "--refine-tokens", 3, "--n-docs", 1)
    _, (words, _) = staged.run("incontext", *stages)
    ScriptedBackend.model = ScriptedModel(lambda prompt: "")
    ScriptedBackend.model.tokenizer, ScriptedBackend.model.fingerprint = LetterTokenizer(), "other-weights"
    _, (letters, _) = staged.run("incontext", *stages, results="elsewhere")  # not the stored run: the caches
    assert [(hit["title"], hit["tokens_kept"], hit["tokens_retrieved"]) for hit in words["retrieved"] + letters["retrieved"]] \
        == [("Alpha Film", 3, 10), ("Alpha Film", 3, len(PASSAGES["Alpha Film"]))]
    assert "Alpha Film\nAlp\n" in next(p for p in ScriptedBackend.model.prompts if BRIDGE in p)
