"""The retrievers: BM25 scores against hand values, both BM25 backends agreeing on real data,
toy retrieval for every retriever, index caching (hit, corruption) and option errors."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

from raghub.cache import MANIFEST, Cache
from raghub import Passage, UsageError
from raghub.plugins.retrievers.bm25 import BM25S, RankBM25, bm25_tokens
from raghub.plugins.retrievers.dense import DenseRetriever
from raghub.kits.vector_index import ivf_list_count

BM25_BACKENDS = [BM25S, RankBM25]
SQUAD_DEV = Path("squad") / "dev-v1.1.rebuilt-from-explorer-html.json"

TOY = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
    "The Great Wall of China runs across the northern border of ancient China.",
    "Python is a programming language that emphasises readable code.",
]
TOY_QUERIES = {  # query -> position of the obviously relevant passage
    "Which tower stands in Paris?": 0,
    "how do plants use sunlight": 1,
    "great wall china border": 2,
    "readable programming language": 3,
}


def passages(texts: list[str]) -> list[Passage]:
    return [Passage(id=str(position), text=text) for position, text in enumerate(texts)]


class CountingCache(Cache):
    """A Cache that counts how often each kind of entry is built."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.builds: Counter[str] = Counter()

    def get_or_build(self, kind, key, build, load):
        def counted_build(folder):
            self.builds[kind] += 1
            build(folder)

        return super().get_or_build(kind, key, counted_build, load)


def corrupt_entries(cache: Cache, kind: str) -> None:
    """Overwrite every data file of every `kind` entry, leaving the manifests as they were."""
    for path in (cache.root / kind).glob("*/*"):
        if path.name != MANIFEST:
            path.write_bytes(b"corrupted")


def test_bm25_tokens_are_lowercase_words_without_stopwords():
    assert bm25_tokens("The Tower's height: 330 m, in PARIS!") == ["tower", "s", "height", "330", "m", "paris"]


@pytest.mark.parametrize("backend", BM25_BACKENDS, ids=lambda cls: cls.name)
def test_bm25_scores_equal_hand_computed_okapi(backend, tmp_path):
    retriever = backend(Cache(tmp_path))
    retriever.index(passages(["apple banana", "apple cherry cherry", "date"]), "hand")
    # N = 3, avgdl = 2; "cherry": df 1, tf 2 in the 3-word passage 1; k1 = 1.5, b = 0.75
    cherry = math.log((3 - 1 + 0.5) / (1 + 0.5)) * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 3 / 2))
    [(best, score), *rest] = retriever.search(["cherry"], 3)[0]
    assert best == 1 and score == pytest.approx(cherry, rel=1e-12)
    assert rest == [(0, 0.0), (2, 0.0)]
    # "apple" is in 2 of 3 passages: ln(1.5 / 2.5) < 0 is floored to 0, so it adds nothing
    assert retriever.search(["apple cherry"], 1) == retriever.search(["cherry"], 1)
    assert [score for _, score in retriever.search(["apple"], 3)[0]] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BM25_BACKENDS, ids=lambda cls: cls.name)
def test_bm25_finds_the_relevant_toy_passage_and_breaks_ties_by_position(backend, tmp_path):
    retriever = backend(Cache(tmp_path))
    retriever.index(passages(TOY + [TOY[3]]), "toy")
    results = retriever.search(list(TOY_QUERIES), 2)
    assert [ranked[0][0] for ranked in results] == list(TOY_QUERIES.values())
    python_hits = results[3]
    assert [position for position, _ in python_hits] == [3, 4]  # a duplicate: earlier first
    assert python_hits[0][1] == python_hits[1][1] > 0
    assert len(retriever.search(["tower"], 50)[0]) == len(TOY) + 1


@pytest.mark.parametrize("backend", BM25_BACKENDS, ids=lambda cls: cls.name)
def test_bm25_index_is_loaded_from_cache_and_rebuilt_when_corrupted(backend, tmp_path):
    cache = CountingCache(tmp_path)
    first = backend(cache)
    first.index(passages(TOY), "toy")
    expected = first.search(list(TOY_QUERIES), 3)

    second = backend(cache)
    second.index(passages(TOY), "toy")
    assert cache.builds["bm25-index"] == 1
    assert second.search(list(TOY_QUERIES), 3) == expected

    corrupt_entries(cache, "bm25-index")
    third = backend(cache)
    third.index(passages(TOY), "toy")
    assert cache.builds["bm25-index"] == 2
    assert third.search(list(TOY_QUERIES), 3) == expected

    backend(cache, k1=1.2).index(passages(TOY), "toy")  # another setting: another index
    assert cache.builds["bm25-index"] == 3


@pytest.mark.parametrize(
    ("retriever", "options", "message"),
    [
        (BM25S, {"b": 1.5}, "--b must be at most 1, not 1.5"),
        (RankBM25, {"k1": -1.0}, "--k1 must be at least 0"),
        (DenseRetriever, {"index_type": "annoy"}, "--index-type must be one of flat, ivf, hnsw"),
        (DenseRetriever, {"similarity": "l2"}, "--similarity must be one of"),
        (DenseRetriever, {"encode_batch_size": 0}, "--encode-batch-size must be at least 1"),
    ],
)
def test_bad_options_give_one_usage_error(retriever, options, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        retriever(Cache(tmp_path), **options)


@pytest.mark.parametrize("retriever", [BM25S, RankBM25, DenseRetriever], ids=lambda cls: cls.name)
def test_a_corpus_without_words_gives_a_usage_error(retriever, tmp_path):
    corpus = [] if retriever is DenseRetriever else passages(["The", "", "a, an; and."])
    with pytest.raises(UsageError, match="retrieval corpus has no"):
        retriever(Cache(tmp_path)).index(corpus, "empty")


def test_ivf_list_count_follows_4_sqrt_n_with_39_points_per_list():
    assert ivf_list_count(10) == 1  # too few points for more than one list
    assert ivf_list_count(390) == 10  # 4·sqrt(390) ≈ 79, but only 390 // 39 = 10 lists
    assert ivf_list_count(1_000_000) == 4000  # 4·sqrt(10^6)


@pytest.mark.real_model
def test_dense_finds_the_relevant_toy_passage_with_every_index_type_and_caches(tmp_path):
    cache = CountingCache(tmp_path)
    for index_type in ("flat", "ivf", "hnsw"):
        retriever = DenseRetriever(cache, index_type=index_type)
        retriever.index(passages(TOY), "toy")
        results = retriever.search(list(TOY_QUERIES), 2)
        assert [ranked[0][0] for ranked in results] == list(TOY_QUERIES.values()), index_type
        assert all(ranked[0][1] > ranked[1][1] for ranked in results)  # raw cosine, best first
    assert cache.builds == {"dense-embeddings": 1, "dense-index": 3}

    DenseRetriever(cache).index(passages(TOY), "toy")
    assert cache.builds == {"dense-embeddings": 1, "dense-index": 3}

    corrupt_entries(cache, "dense-index")
    rebuilt = DenseRetriever(cache)
    rebuilt.index(passages(TOY), "toy")
    assert cache.builds == {"dense-embeddings": 1, "dense-index": 4}
    assert rebuilt.search(["Which tower stands in Paris?"], 1)[0][0][0] == 0


def squad_dev_paragraphs_and_questions() -> tuple[list[Passage], list[str]]:
    if not os.environ.get("RAGHUB_DATA_DIR"):
        pytest.skip("RAGHUB_DATA_DIR is unset: the BM25 agreement check reads SQuAD dev from it")
    path = Path(os.environ["RAGHUB_DATA_DIR"]) / SQUAD_DEV
    if not path.is_file():
        pytest.skip(f"{path} is missing (see the data directory's README)")
    articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    paragraphs = [
        Passage(id=f"{article['title']}-{number}", text=paragraph["context"], title=article["title"])
        for article in articles
        for number, paragraph in enumerate(article["paragraphs"])
    ]
    questions = [qa["question"] for article in articles for p in article["paragraphs"] for qa in p["qas"]]
    return paragraphs, questions


@pytest.mark.real_model
def test_both_bm25_backends_give_the_same_top_k_on_squad_dev(tmp_path):
    paragraphs, questions = squad_dev_paragraphs_and_questions()
    # short queries (every 25th question) and long ones with repeated words (every 40th paragraph)
    queries = questions[::25] + [paragraph.text for paragraph in paragraphs[::40]]
    rankings = {}
    for backend in BM25_BACKENDS:
        retriever = backend(Cache(tmp_path))
        retriever.index(paragraphs, "squad-dev")
        rankings[backend.name] = retriever.search(queries, 10)
    for query, fast, reference in zip(queries, rankings["bm25"], rankings["bm25-rank"]):
        assert [position for position, _ in fast] == [position for position, _ in reference], query
        assert [score for _, score in fast] == pytest.approx([score for _, score in reference], rel=1e-9)
